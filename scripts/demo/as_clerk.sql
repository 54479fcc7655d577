\pset footer off
\echo
\echo '== 6. The billing clerk is refused: no right on the view, no grant on the key'
SELECT current_user, * FROM patients_decrypted;
SELECT decrypt_phi(ssn) FROM patients;
\echo
\echo '   ... but may see the columns it was granted (ciphertext for the SSN)'
SELECT mrn, admitted_on, length(ssn::bytea) AS ssn_ciphertext_bytes FROM patients ORDER BY id;
