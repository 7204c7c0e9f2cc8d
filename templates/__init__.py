"""Data files installed with speedtune: chat templates (chat/*.jinja) and Ollama Modelfile templates (ollama/*)."""
