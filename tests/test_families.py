"""Model-family facts: every registered family declares them completely and consistently, the
rest of nlm reads them instead of comparing family names, and a new family is one model file
plus one registry line plus its presets (docs/ARCHITECTURE.md, "Adding a model family")."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from nlm.errors import NLMError
from nlm.models import FAMILIES, build_model, families_where, model_class
from nlm.models.base import CausalLanguageModel, IncrementalDecoder, LanguageModel
from nlm.models.presets import PRESETS
from nlm.shards import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
# The facts each family's class declares in its own body (no silent inheritance of a default).
CLASS_FACTS = (
    "family",
    "config_class",
    "objective",
    "causal",
    "recurrent",
    "max_positions_field",
    "summary_type",
)
PRESET_CASES = [(f, p) for f in FAMILIES for p in PRESETS[f]]


def check_class_facts(family: str) -> type[LanguageModel]:
    cls = model_class(family)
    missing = [fact for fact in CLASS_FACTS if fact not in vars(cls)]
    assert not missing, f"{cls.__name__} does not declare {missing}"
    assert cls.family == family
    assert issubclass(cls, LanguageModel)
    assert cls.objective in OBJECTIVES
    assert isinstance(cls.causal, bool) and isinstance(cls.recurrent, bool)
    assert cls.summary_type in (None, "first", "last")
    if cls.max_positions_field is not None:
        assert cls.max_positions_field in {f.name for f in dataclasses.fields(cls.config_class)}
    # Consistency: what the trainer, evaluation, generation and serving derive from them.
    assert cls.causal == issubclass(cls, CausalLanguageModel)
    if cls.causal:
        assert cls.objective == "clm"  # clm shards train left-to-right models
    # A clm model that is not causal (elmo) is scored by its two directions: it says so.
    assert cls.backward_lm == (cls.objective == "clm" and not cls.causal)
    if cls.recurrent:
        assert cls.causal and cls.max_positions_field is None  # a carried state is unbounded
    if cls.summary_type == "last":
        assert cls.causal  # left-padded batches end at every row's last token
    return cls


def check_instance_facts(model: LanguageModel) -> None:
    config = model.config
    cls = type(model)
    limit = model.max_positions
    if cls.max_positions_field is None:
        assert limit is None
    else:
        assert limit == getattr(config, cls.max_positions_field) and limit > 0
    assert model.context_size is None or model.context_size >= 1
    assert isinstance(model.hidden_size, int) and model.hidden_size > 0
    assert isinstance(model.flops_per_token(64), float)
    heads = model.pretraining_head_parameters()
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for p in heads)
    if model.causal:
        assert isinstance(model, IncrementalDecoder)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_registered_family_declares_its_facts(family):
    check_class_facts(family)
    assert set(PRESETS[family]) >= {"tiny", "small", "base"}


@pytest.mark.parametrize(("family", "preset"), PRESET_CASES)
def test_every_family_builds_from_each_preset_with_its_facts(family, preset):
    with torch.device("meta"):  # shapes only: the base presets cost no memory or init time
        model = build_model(family, preset)
    check_instance_facts(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_instance_facts_match_what_the_model_does(family):
    torch.manual_seed(0)
    model = build_model(family, "tiny", vocab_size=97).eval()
    ids = torch.randint(7, 97, (2, 9))
    with torch.no_grad():
        out = model(ids)
    assert out.hidden.shape == (2, 9, model.hidden_size)
    if model.max_positions is not None:
        with pytest.raises(NLMError, match="max_positions"):
            model(torch.randint(7, 97, (1, model.max_positions + 1)))
    if model.context_size is not None:  # a change further back than its context is not seen
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] - 7 + 1) % 90 + 7
        with torch.no_grad():
            again = model(changed).logits
        seen = model.context_size  # position t sees t-context_size+1 .. t
        torch.testing.assert_close(again[:, seen:], out.logits[:, seen:], rtol=0, atol=0)
    if model.recurrent:
        assert out.state is not None
        with torch.no_grad():
            carried = model(ids[:, :1], state=out.state).logits
            fresh = model(ids[:, :1]).logits
        assert not torch.allclose(carried, fresh)
    frozen = model.pretraining_head_parameters()
    assert bool(frozen) == (family == "bert")


def reference_flops(family: str, num_params: int, config, seq_len: int) -> float:
    """The trainer's FLOPs per token before the counts moved onto the model classes: 6N, plus
    attention's 12·L·H·Q·T for the Transformers."""
    flops = 6.0 * num_params
    if family in ("gpt", "bert"):
        flops += 12.0 * config.n_layer * config.n_embd * seq_len
    if family == "transformer":  # encoder self-, decoder self- and cross-attention per layer
        flops += 12.0 * 3 * config.n_layer * config.n_embd * seq_len
    return flops


@pytest.mark.parametrize(("family", "preset"), PRESET_CASES)
def test_flops_per_token_equal_the_former_formula(family, preset):
    with torch.device("meta"):
        model = build_model(family, preset)
    for seq_len in (35, 64, 1024):
        assert model.flops_per_token(seq_len) == reference_flops(
            family, model.num_parameters(), model.config, seq_len
        )


def test_model_flops_per_token():
    # nanoGPT's estimate for GPT-2 124M: 6N + 12 L H Q T.
    with torch.device("meta"):
        gpt = build_model("gpt", "base")
    n = gpt.num_parameters()
    assert 124e6 <= n < 125e6
    assert gpt.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
    lstm = build_model("lstm", "tiny")  # no attention term: 6N
    assert lstm.flops_per_token(35) == 6 * lstm.num_parameters()


# --- every other list of families comes from the registry --------------------------------------


def test_lists_of_families_derive_from_the_registry():
    from nlm.cluster.train.config import TrainConfig
    from nlm.finetune.heads import finetunable_families
    from nlm.inference import serving_endpoints
    from nlm.serve.schemas import Family, ModelInfo
    from nlm.study.pipeline import StudyConfig
    from nlm.workflows.foundation_demo import FAMILIES as DEMO_FAMILIES

    assert typing.get_args(Family) == tuple(FAMILIES)
    enum = ModelInfo.model_json_schema()["properties"]["family"]["enum"]
    assert enum == list(FAMILIES)
    assert DEMO_FAMILIES == tuple(FAMILIES)
    assert set(PRESETS) == set(FAMILIES)
    for family in FAMILIES:
        TrainConfig(data="d", out="o", model=family).check()
    with pytest.raises(NLMError, match="one of fnn, rnn, lstm, gpt, bert"):
        TrainConfig(data="d", out="o", model="gru").check()
    assert finetunable_families() == ["gpt", "bert"]
    with pytest.raises(
        NLMError, match="bert is not a causal LM; the study trains fnn, rnn, lstm, gpt"
    ):
        StudyConfig(models=["fnn", "bert"]).check()
    assert families_where(lambda cls: cls.causal) == ["fnn", "rnn", "lstm", "gpt"]
    assert families_where(lambda cls: cls.recurrent) == ["rnn", "lstm"]
    endpoints = {f: serving_endpoints(model_class(f)) for f in FAMILIES}
    assert endpoints["gpt"] == ("generate", "score", "embed", "neighbors")
    assert endpoints["bert"] == ("fill-mask", "score", "embed", "neighbors")
    assert endpoints["lstm"] == endpoints["fnn"] == endpoints["gpt"]
    assert endpoints["elmo"] == ("score", "embed", "neighbors")  # bidirectional: no generate
    assert families_where(lambda cls: cls.backward_lm) == ["elmo"]


def test_importing_the_registry_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from nlm.models import FAMILIES; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- nothing outside nlm/models decides by a family's name ---------------------------------------

PRODUCT = ("nlm", "cluster", "serve", "jobs", "scripts")
# Tuned per-family learning rates, not a fact about the families: the config refactor moves them
# next to the presets (nlm/models/presets.py), where this guard does not look.
ALLOWED = {("cluster/train/config.py", "default_lr")}


class FamilyNameUse(ast.NodeVisitor):
    """Comparisons with a family's name (`family == "bert"`, `model in ("rnn", "lstm")`), and
    lists of family names (a redeclared registry, a named subset of it)."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str, str]] = []
        self.scope: list[str] = []

    def _names(self, node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and node.value in FAMILIES:
            return [node.value]
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return [n for e in node.elts for n in self._names(e)]
        return []

    def _report(self, node: ast.AST, what: str) -> None:
        self.found.append((node.lineno, ".".join(self.scope) or "<module>", what))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815 (ast.NodeVisitor's naming)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.scope.append("<lambda>")
        self.generic_visit(node)
        self.scope.pop()

    def visit_Compare(self, node: ast.Compare) -> None:
        for operand in (node.left, *node.comparators):
            if self._names(operand):
                self._report(node, f"compares with {self._names(operand)}")
        self.generic_visit(node)

    def visit_MatchValue(self, node: ast.MatchValue) -> None:
        if self._names(node.value):
            self._report(node, f"matches {self._names(node.value)}")
        self.generic_visit(node)

    def _collection(self, node: ast.Tuple | ast.List | ast.Set) -> None:
        names = self._names(node)
        if set(names) >= set(FAMILIES) or (not self.scope and len(names) >= 2):
            self._report(node, f"lists families {names}")
        self.generic_visit(node)

    visit_Tuple = visit_List = visit_Set = _collection  # noqa: N815


def family_name_uses(path: Path) -> list[tuple[int, str, str]]:
    visitor = FamilyNameUse()
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return visitor.found


def test_the_guard_sees_family_name_branches():
    source = (
        "RECURRENT = ('rnn', 'lstm')\n"
        "Family = Literal['fnn', 'rnn', 'lstm', 'gpt', 'bert']\n"
        "def f(family, model):\n"
        "    if family == 'bert': pass\n"
        "    x = 1 if model.family in ('rnn', 'lstm') else 2\n"
        "    if 'bert' in family: pass\n"
        "    build('gpt', {'lstm': 1})\n"  # naming one family, a table keyed by them: not a branch
    )
    visitor = FamilyNameUse()
    visitor.visit(ast.parse(source))
    assert [line for line, _, _ in visitor.found] == [1, 2, 4, 5, 6]


def test_no_module_outside_nlm_models_branches_on_a_family_name():
    offenders = []
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            # nlm/hf maps named families onto named transformers architectures (gpt -> GPT-2,
            # bert -> BERT): naming them is its job, as it is nlm/models'. A new family with a
            # transformers twin adds its mapping there; one without is refused by name there.
            if relative.startswith(("nlm/models/", "nlm/hf/")):
                continue
            for line, scope, what in family_name_uses(path):
                if (relative, scope) not in ALLOWED:
                    offenders.append(f"{relative}:{line} ({scope}) {what}")
    assert not offenders, "decide by a family fact (nlm/models/base.py):\n" + "\n".join(offenders)


# --- adding a family: one model file, one registry line, its presets -----------------------------


@pytest.fixture
def bigram(monkeypatch):
    """tests/toy_family.py registered the way docs/ARCHITECTURE.md says, and nothing else."""
    monkeypatch.setitem(FAMILIES, "bigram", "toy_family:BigramLanguageModel")
    tiny = dict(vocab_size=256, embed_dim=16)
    monkeypatch.setitem(PRESETS, "bigram", {"tiny": tiny, "small": tiny, "base": tiny})
    return "bigram"


def test_a_new_family_needs_only_its_file_a_registry_line_and_presets(bigram, tmp_path):
    from nlm.checkpoint import load_checkpoint, save_checkpoint
    from nlm.cluster.train.config import TrainConfig
    from nlm.evaluation import evaluate_documents
    from nlm.finetune.heads import TaskModel
    from nlm.inference import Engine
    from nlm.study.pipeline import StudyConfig
    from nlm.tokenizers import train_tokenizer
    from nlm.workflows.foundation_demo import train_model

    check_class_facts(bigram)
    docs = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 4
    tokenizer = train_tokenizer("word", docs)
    torch.manual_seed(0)
    model = build_model(bigram, "tiny", vocab_size=tokenizer.vocab_size)
    check_instance_facts(model)

    # training (the one-process loop; the Ray trainer takes the same config), evaluation
    config = TrainConfig(data="d", out="o", model=bigram).check()
    assert not config.recurrent and config.optim.lr > 0
    stream = torch.tensor([i for d in tokenizer.encode_batch(docs) for i in [*d, 3]])
    steps, _, loss = train_model(model, stream, tmp_path, (0.001, 3, 3), 2, 8, 1e-2, 0, False)
    assert steps == 3 and loss > 0
    scored = evaluate_documents(model, tokenizer, docs, seq_len=8)
    assert scored["family"] == bigram and scored["stride"] == 7  # windows overlap by its context

    # checkpoint, serving (generation through the public decoding protocol), the study
    path = save_checkpoint(tmp_path / "model", model, tokenizer)
    engine = Engine(load_checkpoint(path))
    assert engine.endpoints == ("generate", "score", "embed", "neighbors")
    (answer,) = engine.generate([engine.generation_job("the cat", 4, seed=1, stop_at_eos=False)])
    assert len(answer["token_ids"]) == 4
    (score,) = engine.score([engine.score_job("the cat sat")])
    assert score["measure"] == "log-likelihood" and score["num_tokens"] == 3
    assert len(engine.embed([engine.embed_job("the cat")])[0]) == model.hidden_size
    assert len(engine.neighbors("cat", 2)) == 2
    assert StudyConfig(models=[bigram]).models == [bigram]

    # not fine-tunable: it declares no summary_type
    with pytest.raises(NLMError, match="needs a gpt or bert checkpoint, not bigram"):
        TaskModel(model, "classify", [0, 1])
