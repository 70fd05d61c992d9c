"""The word-vector study: compare the embedding tables of several models on one vocabulary.

metrics.py   overlap@k of neighbour lists, Spearman of pairwise similarities, linear CKA,
             orthogonal Procrustes residual
compare.py   load checkpoints, check they share a tokenizer, compute everything (report.json data)
report.py    write report.md, report.json and the PNG figures
"""
