"""CLI commands around a job spec: run, plan, submit (each `add_arguments` + `main`)."""
