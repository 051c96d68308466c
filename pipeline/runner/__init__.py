"""The one stage loop, whatever started the processes.

    resolve inputs (manifests, upstream export, fingerprint, cache hit)   resolve.py
      -> open the stage's MLflow run                                      job.py
      -> launch on a backend: Ray Train workers, or the processes of     ray_backend.py
         torchrun / accelerate launch                                     local_backend.py
      -> finish: export artifact, cache tags, registry                    job.py

`plan` is the same resolution without the launch (plan.py). Every rank of every backend builds its
StageContext with `context.build_context`. The per-stage facts come from pipeline.stages.table.
"""
