"""One panel per file; each is a `Panel` whose `show(view)` redraws it from a snapshot."""
