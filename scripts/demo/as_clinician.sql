\set ON_ERROR_STOP on
\pset footer off
\echo
\echo '== 5. The clinician reads through the view'
SELECT current_user, * FROM patients_decrypted ORDER BY id;
