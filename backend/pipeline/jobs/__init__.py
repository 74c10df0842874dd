"""Project jobs: pre-label a whole Label Studio project, page by page, with progress, and resumable.

A job reads the project's tasks through the SDK a page at a time (memory stays flat in the number
of tasks), keeps those its scope wants, pre-labels them with the backend's own pipeline, examples
and model_version for the project, and writes the predictions into Label Studio in bulk. Opening a
task afterwards makes no /predict call: it holds a prediction of the current model_version.

Resuming needs no bookkeeping of its own: a task written before a kill holds a prediction of the
current version, so a second run skips it; a task asked but not written finds its answer in the
response cache (no call is paid twice); a (task, version) is claimed in the store before it is
written (pipeline/delivery.py), so no task gets two predictions of one version. The job's record in
the store (progress, failures, a cancel flag) is what `GET /jobs/<id>` and `llm-ner prelabel` show.

The package follows rq's split of record, queue and worker:
- `records.py`: the job records in the store (rq's job and registry);
- `tries.py`: what every runner does with a task: read it, try it, collect the tries, watch the cancel flag;
- `process.py`: the in-process runner (one process runs the whole job);
- `parts.py`: the RQ runner's work (the planner, one part's run, a part RQ gave up on);
- `jobqueue.py`: the RQ queue (protocol/rqworker.py is the worker process);
- `batch.py`: a job through the provider's Batch API.
"""
