"""Data files installed with speedtune as `speedtune.templates`: the named chat templates (chat/*.yaml: Jinja for
training, the equivalent Go template for an Ollama Modelfile, the end-of-turn and stop words)."""
