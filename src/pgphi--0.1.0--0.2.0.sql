-- pgphi 0.1.0 -> 0.2.0. 0.1.0 is released: its script never changes again,
-- and a new installation of 0.2.0 runs it followed by this one, so fresh and
-- upgraded databases get exactly the same objects.
\echo Use "ALTER EXTENSION pgphi UPDATE" to load this file. \quit
