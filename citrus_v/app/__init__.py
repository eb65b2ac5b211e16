"""The web app: a Gradio page that talks to a running ``citrus-v deploy`` server."""
