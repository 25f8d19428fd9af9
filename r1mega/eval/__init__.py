"""Evaluation the way R1 reports it: pass@1 over k samples, cons@k, unbiased pass@k, on the shipped math sets.

``r1mega-eval`` (:mod:`r1mega.eval.cli`) evaluates a checkpoint; :func:`r1mega.eval.runner.evaluate` is the same
evaluation for any engine (training calls it with its own).
"""
