"""Where masks live: the local registry (``local``), the Hub (``hub``), the LAPE authors' files
(``authors``), dataset cards (``cards``) and figures (``figures``)."""
