"""Networks of the method (explicit keyword arguments; each saves/loads itself from a folder)."""
