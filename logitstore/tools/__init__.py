"""Tools over finished stores: info and verify (inspect_store.py), the contact sheet (show.py),
copy and pack (transfer.py), merge and select (combine.py). They read stores; none loads a teacher."""
