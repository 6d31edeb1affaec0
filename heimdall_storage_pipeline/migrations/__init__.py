"""SQL migrations of the project's own tables, by target database (see ``core/migrations.py``)."""
