"""The networks of MOVA, one plain module per file."""
