"""Batch retrieval with a trained or registered DetailFusion model.

* ``embed.py``: the one embedding code path (evaluation, stage-3 cache, pyfunc, batch jobs);
* ``search.py``: exact search; ``faiss_index.py``: FAISS indexes; ``searching.py``: the job's use of them;
* ``inputs.py`` / ``storage.py``: galleries and query sets on local paths or ``s3://``;
* ``shards.py``: resumable gallery embedding shards; ``resolve.py``: the model a job runs;
* ``job.py``: ``run_retrieval`` (``detailfusion retrieve``, ``cli.py``); ``writing.py`` /
  ``outputs.py``: results, errors, CIRR submission, HTML page, atomic publishing;
  ``tracking.py``: the MLflow run of a job.

Nothing is imported here, so the MLflow pyfunc can import ``embed`` without the job's
dependencies.
"""
