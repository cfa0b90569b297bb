"""The built-in OpenAI-compatible model server (`python -m kubetune.trainer.serve --model DIR`).

`server` (HTTP app, CLI, lifecycle, authentication, admission), `protocol` (request validation,
OpenAI response shapes), `engine` (finding and loading the model and adapters, batched generation),
`batch` (the batch scheduler), `adapters` (the `--adapter-config` file), `metrics` (Prometheus),
`process` (the server as a subprocess: tests, bench, `kubetune run --serve`). It shares the trainer
image but nothing with training: no module here imports the training code.
"""
