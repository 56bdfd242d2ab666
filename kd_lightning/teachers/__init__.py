"""What serves or reaches a teacher: the served-teacher client (vLLM ``prompt_logprobs`` or an OpenAI-compatible
completions echo), its wire form, the OpenAI client settings, and the loopback scoring server (``kdl serve``)."""
