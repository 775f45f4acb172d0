"""How bytes and requests move: HTTP (aiohttp bodies and sessions, threaded GETs, TLS through memory BIOs),
the ascp runner, the token bucket, the one retry loop (:mod:`~asyncdepo.transport.pacer`) and the one mapping
of transport failures into :mod:`asyncdepo.errors` (:mod:`~asyncdepo.transport.failures`).

Nothing here knows an archive or the engine; the engine and the adapters both build on it.
"""
