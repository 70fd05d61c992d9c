# nlm on the official Ray image: the image KubeRay's manifests (cluster/k8s/) run.
#   docker build -t nlm:0.1.0 .     # then push it where your cluster pulls from
# The base image's Ray and Python are the ones pyproject.toml pins (ray 2.60.0, Python 3.11;
# tests/test_k8s.py checks that they agree); its `-gpu` variant carries the CUDA libraries,
# and the same image runs the CPU pods.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /app
# The pinned heavy dependencies first, so a code change does not reinstall them. PyPI's torch
# wheel for Linux is the CUDA build. DeepSpeed builds from source against that torch with no
# CUDA ops compiled in (nlm passes torch's own fused AdamW as a client optimizer).
RUN pip install --no-cache-dir "torch==2.13.0" \
 && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation "deepspeed==0.19.8"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users nlm nlm
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users serve serve
COPY --chown=ray:users jobs jobs
COPY --chown=ray:users configs configs
COPY --chown=ray:users scripts scripts
# nlm with the rest of its pinned dependencies (ray[train,serve]==2.60.0 is already there);
# then a smoke import of the three layers jobs and Serve load.
RUN pip install --no-cache-dir /app \
 && python -c "import nlm.cli, nlm.cluster.train.driver, nlm.serve.app"
