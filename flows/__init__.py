"""Prefect 3 flows that orchestrate the DVC pipeline (``dvc.yaml``) on CPU and GPU work pools.

One flow per module: ``pipeline`` (data stages on ``cpu``, training on ``gpu`` via the ``train``
deployment, then evaluate + register), ``train`` (the three training stages as one DVC
experiment), ``ablations`` (variants fanned out as parallel ``train`` runs), ``promote`` (gated
promotion with an optional human approval step) and ``batch_retrieval``. Deployments live in
``prefect.yaml`` at the repository root. The flows never re-implement a stage: their tasks run
``dvc`` / ``detailfusion`` commands in a per-run git checkout and move data between workers only
through the DVC remote (S3).
"""
