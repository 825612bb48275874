"""Where a run executes: processes and collectives (``distributed``), DDP/FSDP wrapping and precision
(``parallel``), deterministic algorithms, and returning freed heap to the OS (``heap_trim``)."""
