"""Teacher corpus generation (``kdl generate``): self-instruct, instruction files and labelled
augmentation, answered by a local model or an OpenAI-compatible API, cached and resumable."""
