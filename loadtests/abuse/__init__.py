"""`make abuse`: hostile clients against a served instance (__main__.py: the cases, the run and its
report; clients.py: the hostile clients, the interactive traffic beside them and the memory watch)."""
