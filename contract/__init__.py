"""What learning and serving must read the same way: key names, the decision log entry, the model inputs
and the history rule, money in cents, ranking and first fit. Imported by both sides; imports neither."""
