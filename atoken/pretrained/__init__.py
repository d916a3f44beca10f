"""Models by name: the one model table (`registry`), loading by name (`hub`), and resumable
downloads of the official weights (`download`)."""
