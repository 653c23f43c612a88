"""Where masks live: the local registry (``local``, its index in ``index``, its locks in ``locks``), the
Hub (``hub``), the LAPE authors' files (``authors``) and dataset cards (``cards``)."""
