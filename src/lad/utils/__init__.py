"""Small shared helpers: atomic outputs, logging and progress bars, seeding."""
