"""mtad: the mail transfer agent.

Inbound SMTP (MX on 25, submission on 587 and 465), the delivery pipeline
(checks -> route -> deliver) and, in ``mtad.outbound``, the queue workers.
``mtad.service.start`` is the daemon entry; ``delivery.submit.submit_message``
is the one submission path shared with the HTTP API.
"""
