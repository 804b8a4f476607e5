"""The parts of ``benchmarks/webhook.py``: the pod and the request, the servers, the client,
``handle()`` in process, the report."""
