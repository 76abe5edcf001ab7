"""Alembic migrations of the feedback store's schema; run by `convnet.feedback.store.upgrade`."""
