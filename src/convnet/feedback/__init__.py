"""Feedback on predictions: people say which class an image really is; the server keeps the image
and the label in a database (store.py, schema under migrations/), `convnet feedback export` writes
them out as an image-folder dataset (export.py) and `convnet train --extra` trains on it
(merge.py).

Nothing is imported here, so that training can use merge.py without SQLAlchemy loaded.
"""
