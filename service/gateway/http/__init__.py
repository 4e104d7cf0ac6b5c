"""HTTP/JSON beside gRPC (KServe v1 paths) and the web page, served by the gateway.

``front`` runs uvicorn on the gateway's loop and calls the gateway's own gRPC server;
``app`` routes; ``calls`` holds what every call shares (body limits, deadline,
credentials, errors); ``kserve`` converts JSON to and from the protocol's messages;
``stream`` sends ``ExplainStream`` as server-sent events; ``static/`` is the page.
"""
