\pset footer off
\echo
\echo '== 7. Moving a ciphertext to another patient row is detected (the MRN is bound as context)'
UPDATE patients SET ssn = (SELECT ssn FROM patients WHERE mrn = 'MRN-1001') WHERE mrn = 'MRN-1002';
SELECT mrn, ssn FROM patients_decrypted WHERE mrn = 'MRN-1002';
