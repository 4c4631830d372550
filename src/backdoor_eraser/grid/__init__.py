"""The benchmark grid: specs (axes of datasets, architectures, attacks, defenses, seeds, clean
fractions) expanded into cells, a SQLite store of their results, executors that run them (locally or
on Ray) and a report built from the store alone. ``backdoor-eraser bench`` / ``report``."""
