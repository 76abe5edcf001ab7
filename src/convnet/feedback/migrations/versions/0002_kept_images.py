"""Images kept by `predict?keep=1`, waiting for feedback that names them by prediction_id.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kept_images",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("predicted", sa.String(200), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("media_type", sa.String(40), nullable=False),
        sa.Column("image", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_kept_images_created_at", "kept_images", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_kept_images_created_at", "kept_images")
    op.drop_table("kept_images")
