"""The broker protocol: the Celery configuration every app shares, and the one message contract."""
