"""Know your archive: analytics over a catalog (``figures``: DuckDB over Arrow, one node, the Parquet
read in place) and the page a person reads (``render``: plots, tables, findings)."""
