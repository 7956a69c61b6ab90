"""kdlabctl: the command-line client of kdlabd."""
