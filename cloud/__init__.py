"""The cloud on another machine, beyond the paper's in-process run: the cloud service
(server.py, `python -m cloud.server`), the device's client (client.py), and `python -m cloud`,
cdcda.py's run with its steps 2-3 done by that service or step 2 by any OpenAI-compatible
server (vLLM).
"""
