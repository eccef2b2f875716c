"""Everything a person reads: tables, the live progress lines, the DAG picture (rich, text)."""
