"""The receive path: from a TCP connection to an instance durably stored and indexed.

Read the modules in the order the bytes take:

1. :mod:`~dicomai.ingest.scp` — the Storage SCP (:class:`~dicomai.ingest.scp.Receiver`):
   start/stop, how each association is set up, and its bookkeeping (audit, early close of
   the studies it delivered: :mod:`~dicomai.ingest.transfers`); our AE and presentation
   contexts are :mod:`~dicomai.ingest.storage_ae`, and the C-STORE requests pynetdicom
   would answer wrongly :mod:`~dicomai.ingest.store_guard`.
2. :mod:`~dicomai.ingest.listener` — the listening socket: accept, peer address check,
   listen backlog; the association starts (or is rejected for the limit) here.
3. :mod:`~dicomai.ingest.lobby` — connections between accept and a complete A-ASSOCIATE-RQ:
   no thread each, capped, timed out; the TLS handshake.
4. :mod:`~dicomai.ingest.pdu_reader` — every PDU of an association read with a deadline and a
   size cap; P-DATA to the fast path, the rest to pynetdicom's state machine.
5. :mod:`~dicomai.ingest.fast_store` — C-STORE requests served straight from their PDUs.
6. :mod:`~dicomai.ingest.store_instance` — one C-STORE: checks, durable write, index, status.
7. :mod:`~dicomai.ingest.file_limits` — what a received data set may cost before it is
   refused: inflated size, element count, nesting depth, pixel budget, the codestream's own
   size (checked without decoding).
8. :mod:`~dicomai.ingest.record` — the header read and checked once; the index's fields.
9. :mod:`~dicomai.ingest.index` — the instance index: an instance's row, its study and the
   RECEIVING job it joins, committed in groups (:mod:`~dicomai.ingest.group_commit`,
   :mod:`~dicomai.ingest.index_sql`).
10. :mod:`~dicomai.ingest.copies` — small instances made durable through their database row.

Over DICOMweb: :mod:`~dicomai.ingest.stow_server` (the STOW-RS server, its door) reads a
request's body with :mod:`~dicomai.ingest.stow_body` (parts split by
:mod:`~dicomai.ingest.stow_parts`, each stored as a C-STORE would be) and answers with
:mod:`~dicomai.ingest.stow_response`.

Beside them: :mod:`~dicomai.ingest.pynetdicom_seam`, the only module that uses pynetdicom's
private names (pinned version, checked at start), and :mod:`~dicomai.ingest.uid_cache`
(standard UIDs of association requests converted once). The spool itself is
:mod:`dicomai.ingest.spool` (shared with the worker and sender).
"""
