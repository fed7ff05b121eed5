"""The receive path: from a TCP connection to an instance durably stored and indexed.

Read the modules in this order (the order the bytes take):

1. :mod:`dicomai.ingest.file_limits` — what a received data set may cost before it is
   refused: inflated size, element count, nesting depth, pixel budget, the codestream's own
   size (checked without decoding).
"""
