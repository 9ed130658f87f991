"""The report's PNGs. Each plot function takes (runs, cells, path), draws only when it has data
and returns whether it wrote the file."""
