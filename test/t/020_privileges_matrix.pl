# Least privilege, as a generated matrix: every routine of the extension
# (from pg_proc) and every relation and sequence it owns (from pg_depend),
# times every kind of role, is run and compared with the outcome written down
# below. A routine or relation without a row fails the test, so a new one
# must be classified before it ships. Then: PUBLIC holds nothing that touches
# keys (aclexplode), conversions in reencrypt_progress belong to their role,
# group-wide grants take two custodians, and retirement cannot be blocked by
# a forged value or a held lock.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use PgphiTest;

# The kinds of role, in the order of the columns below.
#   public  a login role with nothing but PUBLIC's privileges
#   enc     member of pgphi_encrypt, no key grant     enc_g  ... with encrypt on the keys
#   dec     member of pgphi_decrypt, no key grant     dec_g  ... with decrypt on the keys
#   app     member of both, with encrypt and decrypt on the keys
#   cust    key custodian    aud  key auditor    super  superuser
my @kinds = qw(public enc enc_g dec dec_g app cust aud super);

# Expected outcome of calling each routine as each kind of role, with the
# arguments generated below (sample_args): "ok" (it ran), or the SQLSTATE it
# fails with (42501 is a refused privilege: EXECUTE or a key grant). Routines
# that SQL cannot call (triggers, internal arguments) are checked for EXECUTE
# alone: "x" held, "-" not held. The second column says whether the routine
# touches keys or the key catalog ("key") or neither ("type": the encrypted
# type's support and the header reader); PUBLIC may execute only "type" ones.
my $routines = <<'TABLE';
# routine                                                                    touches public enc   enc_g dec   dec_g app   cust  aud   super
pgphi._acting_role()                                                         key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._active_version(integer)                                               key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._approval_dependence(name,name)                                        key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._audit(text,integer,integer,text,text)                                 key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._audit_anchor_last_known()                                             key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._audit_anchors_are_append_only()                                       key     -      -     -     -     -     -     -     -     x
pgphi._audit_catalog_change()                                                key     -      -     -     -     -     -     -     -     x
pgphi._audit_chain_changed()                                                 key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._audit_key_change()                                                    key     -      -     -     -     -     -     -     -     x
pgphi._audit_log_chain()                                                     key     -      -     -     -     -     -     -     -     x
pgphi._audit_log_is_append_only()                                            key     -      -     -     -     -     -     -     -     x
pgphi._audit_row_hash(bytea,pgphi.audit_log)                                 key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._audit_time(timestamp with time zone)                                  key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._audit_value(jsonb,boolean)                                            key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._batch_extent(regclass,integer)                                        key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._batch_key(text)                                                       key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._blind_index_version_of(bytea,integer)                                 key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._catalog_writer()                                                      key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._change_key_grant(text,regrole,text,boolean)                           key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi._change_key_grant(text,regrole,text,boolean,timestamp with time zone)  key     42501  42501 42501 42501 42501 42501 ok    42501 ok
# A strict function given the only value SQL can make of pg_ddl_command, NULL,
# is folded to NULL by the planner before EXECUTE is checked (aclexplode below
# shows PUBLIC does not hold it).
pgphi._changes_pgphi_members(pg_ddl_command)                                 key     ok     ok    ok    ok    ok    ok    ok    ok    ok
pgphi._check_column_type(regclass,name,regtype[],text)                       key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._check_grantee(regrole)                                                key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._citus_apply()                                                         key     -      -     -     -     -     -     -     -     x
pgphi._citus_apply_row(name,jsonb,jsonb)                                     key     42501  42501 42501 42501 42501 42501 42501 42501 22023
pgphi._citus_coordinator_only()                                              key     -      -     -     -     -     -     -     -     x
pgphi._citus_distribution_column(regclass)                                   key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._citus_forward()                                                       key     -      -     -     -     -     -     -     -     x
pgphi._citus_is_shard(regclass)                                              key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._citus_node_role()                                                     key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._citus_placements(regclass)                                            key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._citus_progress_shard(text,regclass,name,text,integer,name,name)       key     42501  42501 42501 42501 42501 42501 42501 42501 55000
pgphi._citus_remote(text,integer,text,text,text,name,text,integer,name,name) key     42501  0A000 0A000 42501 42501 0A000 0A000 42501 0A000
pgphi._citus_replicated_tables()                                             key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._citus_row_key(regclass,jsonb)                                         key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._citus_run_shard(text,regclass,name,text,integer,name,name,bigint)     key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._citus_shard_batches(text,text,name,text,integer,name,name)            key     42501  42P01 42P01 42501 42501 42P01 42P01 42501 42P01
pgphi._citus_shard_changed(text,name)                                        key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._citus_shard_step(text,text,name,text,integer,name,name,text)          key     42501  42P01 42P01 42501 42501 42P01 42P01 42501 42P01
pgphi._citus_sweep(text,regclass,name,text,integer,name,name,text,integer,integer) key     42501  42703 42703 42501 42501 42703 42703 42501 42703
pgphi._citus_sync_local()                                                    key     42501  42501 42501 42501 42501 42501 42501 42501 0A000
pgphi._citus_table_kind(regclass)                                            key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._column_key(regclass,name)                                             key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._column_type(regclass,name)                                            key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._compromise_guard()                                                    key     -      -     -     -     -     -     -     -     x
pgphi._create_dedicated_kek(text,text,text)                                  key     42501  42501 42501 42501 42501 42501 42501 42501 F0000
pgphi._delete_dedicated_kek(text,text,integer,text)                          key     42501  42501 42501 42501 42501 42501 42501 42501 55000
pgphi._delete_dedicated_kek_if_unused(integer)                               key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._destruction_certificate_body(text,integer)                            key     42501  42501 42501 42501 42501 42501 42501 42501 55000
pgphi._destruction_check(integer,integer)                                    key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._encrypt_mode_support(internal)                                        key     -      -     -     -     -     -     -     -     x
pgphi._encrypt_phi_deterministic(bytea,text,boolean,text)                    key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi._encrypt_phi_deterministic(jsonb,text,boolean,text)                    key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi._encrypt_phi_deterministic(text,text,boolean,text)                     key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi._encrypt_phi_version(bytea,text,text,integer)                          key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi._encrypt_phi_version(text,text,text,integer)                           key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi._flush_cache_at_commit()                                               key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._forget_grant_members()                                                key     -      -     -     -     -     -     -     -     x
pgphi._generate_wrapped_dek(text,text,integer,integer,text,boolean)          key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._group_grant_reason(regrole)                                           key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._guard_catalog_ddl()                                                   key     42501  42501 42501 42501 42501 42501 42501 42501 0A000
pgphi._in_extension_script()                                                 key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._key_catalog_changed()                                                 key     -      -     -     -     -     -     -     -     x
pgphi._key_id(text)                                                          key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._key_name(integer)                                                     key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._key_purpose(integer)                                                  key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._key_version_guard()                                                   key     -      -     -     -     -     -     -     -     x
pgphi._key_version_of(bytea,integer)                                         key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._lifecycle_target(text,integer)                                        key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._live_versions(text)                                                   key     42501  ok    ok    42501 42501 ok    42501 42501 ok
pgphi._page_batches(regclass,integer)                                        key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._progress_advance(regclass,name,bigint,bigint)                         key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._progress_begin(regclass,name,integer,integer,bigint,text)             key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._progress_check(regclass,name)                                         key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._progress_finish(regclass,name)                                        key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._progress_finish_swept(regclass,name,boolean)                          key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._progress_get(regclass,name)                                           key     42501  42501 42501 42501 42501 42501 42501 42501 55000
pgphi._progress_pages(regclass,name,text,text,text,integer)                  key     42501  42501 42501 42501 42501 42501 42501 42501 55000
pgphi._progress_sweep(regclass,name,text,text,text,integer)                  key     42501  42501 42501 42501 42501 42501 42501 42501 55000
pgphi._protect_column_done(regclass,name,text)                               key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._protect_column_fill(regclass,name,text,integer,name,bigint,bigint)    key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._protect_column_names(name)                                            key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._protect_column_sql(regclass,name,name)                                key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._protect_column_start(regclass,name,text,integer,name)                 key     42501  42809 42809 42501 42501 42809 42809 42501 42809
pgphi._protect_column_swap(regclass,name,text,name)                          key     42501  42501 42501 42501 42501 42501 42501 42501 42703
pgphi._protect_column_sweep(regclass,name,text,integer,name)                 key     42501  42703 42703 42501 42501 42703 42703 42501 42703
pgphi._protect_column_sync()                                                 key     -      x     x     -     -     x     x     -     x
pgphi._protect_column_trigger_args(name,text,name)                           key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._prune_grant_members()                                                 key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._queue_catalog_refusal(text,text)                                      key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._rebuild_blind_index_pages(regclass,name,name,text,integer,name,text)  key     42501  42703 42703 42501 42501 42703 42703 42501 42703
pgphi._rebuild_blind_index_sql(regclass,name,name,name,text)                 key     42501  42703 42703 42501 42501 42703 42703 42501 42703
pgphi._rebuild_blind_index_start(regclass,name,name,text,integer,name)       key     42501  42703 42703 42501 42501 42703 42703 42501 42703
pgphi._rebuild_blind_index_sweep(regclass,name,name,text,integer,name,text)  key     42501  42703 42703 42501 42501 42703 42703 42501 42703
pgphi._record_audit_event(timestamp with time zone,text,text,text,integer,text,integer,text,text) key 42501 42501 42501 42501 42501 42501 42501 42501 ok
pgphi._record_audit_event(timestamp with time zone,text,text,text,integer,text,integer,text,text,bigint,timestamp with time zone,timestamp with time zone) key     42501  42501 42501 42501 42501 42501 42501 42501 23514
pgphi._record_break_glass_use(integer,oid,timestamp with time zone,bigint)   key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._record_grant_members(integer,text,regrole)                            key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._record_key_use(timestamp with time zone,text,integer,bigint,bigint)   key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._reencrypt_pages(regclass,name,integer,name,text)                      key     42501  42501 42501 42501 42501 42501 42501 42501 55000
pgphi._reencrypt_progress_claim()                                            key     -      -     -     -     -     -     -     -     x
pgphi._reencrypt_sql(regclass,name,name)                                     key     42501  ok    ok    42501 42501 ok    ok    42501 ok
pgphi._reencrypt_start(regclass,name,integer,name,text)                      key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._reencrypt_sweep(regclass,name,integer,name,text)                      key     42501  42501 42501 42501 42501 42501 42501 42501 55000
pgphi._rekey_dek(text,text,integer,integer,text,bytea,text,text)             key     42501  42501 42501 42501 42501 42501 42501 42501 42704
pgphi._rekey_next(integer)                                                   key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi._rekey_start(text,text,text)                                           key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi._rekey_target(text,text)                                               key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._require_retired(text,integer,integer,boolean)                         key     42501  42501 42501 42501 42501 42501 42501 42501 55000
pgphi._rewrap_dek(text,text,integer,integer,text,bytea)                      key     42501  42501 42501 42501 42501 42501 42501 42501 XX001
pgphi._reserve_seals(integer,integer,bigint,bigint,boolean)                  key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._rotate_if_active(integer,integer)                                     key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._shred_at_commit(integer,integer)                                      key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._suspended_at(integer,integer)                                         key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._update_pages(text,text,text,integer,integer,bigint,bigint)            key     42501  42601 42601 42501 42501 42601 42601 42501 42601
pgphi._update_sweep(regclass,text,text,text,integer,integer,integer)         key     42501  42601 42601 42501 42501 42601 42601 42501 42601
pgphi._usage_counts()                                                        key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._verify_audit_anchor(bigint,timestamp with time zone,bigint,bytea,text,text,text,text) key     42501  42501 42501 42501 42501 42501 42501 42501 22023
pgphi._verify_destruction_certificate(text,text,text,text)                   key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._volume_alerts(double precision,bigint,integer,integer)                key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi._writer_ran_statement(regprocedure,text)                               key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi.access_review()                                                        key     42501  42501 42501 42501 42501 42501 ok    ok    ok
pgphi.anchor_audit_log()                                                     key     42501  42501 42501 42501 42501 42501 ok    ok    ok
pgphi.approve_destroy(text,integer)                                          key     42501  42501 42501 42501 42501 42501 55000 42501 55000
pgphi.approve_grant(text,regrole,text)                                       key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.approve_grant_member(text,text,regrole,regrole)                        key     42501  42501 42501 42501 42501 42501 42704 42501 42704
pgphi.approve_rekey(text,text,text)                                          key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.approve_resume(text,integer)                                           key     42501  42501 42501 42501 42501 42501 55000 42501 55000
pgphi.audit_queue_status()                                                   key     42501  42501 42501 42501 42501 42501 42501 ok    ok
pgphi.blind_index(text,text)                                                 key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.blind_index(text,text,integer)                                         key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.blind_index_all_versions(text,text)                                    key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.break_glass(text,text)                                                 key     42501  42501 42501 42501 42501 42501 42501 42501 42501
pgphi.broker_processes()                                                     key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi.broker_status()                                                        key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi.cache_stats()                                                          key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi.ciphertext_info(bytea)                                                 type    ok     ok    ok    ok    ok    ok    ok    ok    ok
pgphi.ciphertext_info(pgphi.encrypted)                                       type    ok     ok    ok    ok    ok    ok    ok    ok    ok
pgphi.citus_setup()                                                          key     42501  42501 42501 42501 42501 42501 42501 42501 0A000
pgphi.citus_sync()                                                           key     42501  42501 42501 42501 42501 42501 42501 42501 0A000
pgphi.citus_verify_audit_logs()                                              key     42501  42501 42501 42501 42501 42501 42501 0A000 0A000
pgphi.create_blind_index_key(text,text,integer,text,text)                    key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.create_decrypted_view(regclass,text,regrole,name[],text,name)          key     42501  ok    ok    ok    ok    ok    ok    42501 ok
pgphi.create_kek(text,text)                                                  key     42501  42501 42501 42501 42501 42501 F0000 42501 F0000
pgphi.create_key(text,text,text,boolean)                                     key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.deactivate_key(text)                                                   key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.decrypt_phi(bytea)                                                     key     42501  42501 42501 42501 ok    ok    42501 42501 ok
pgphi.decrypt_phi(bytea,text,text)                                           key     42501  42501 42501 42501 ok    ok    42501 42501 ok
pgphi.decrypt_phi(pgphi.encrypted)                                           key     42501  42501 42501 42501 ok    ok    42501 42501 ok
pgphi.decrypt_phi(pgphi.encrypted,text,text)                                 key     42501  42501 42501 42501 ok    ok    42501 42501 ok
pgphi.decrypt_phi_bytea(bytea)                                               key     42501  42501 42501 42501 ok    ok    42501 42501 ok
pgphi.decrypt_phi_bytea(bytea,text,text)                                     key     42501  42501 42501 42501 ok    ok    42501 42501 ok
pgphi.decrypt_phi_bytea(pgphi.encrypted)                                     key     42501  42501 42501 42501 ok    ok    42501 42501 ok
pgphi.decrypt_phi_bytea(pgphi.encrypted,text,text)                           key     42501  42501 42501 42501 ok    ok    42501 42501 ok
pgphi.decrypt_phi_jsonb(bytea)                                               key     42501  42501 42501 42501 22P02 22P02 42501 42501 22P02
pgphi.decrypt_phi_jsonb(bytea,text,text)                                     key     42501  42501 42501 42501 22P02 22P02 42501 42501 22P02
pgphi.decrypt_phi_jsonb(pgphi.encrypted)                                     key     42501  42501 42501 42501 22P02 22P02 42501 42501 22P02
pgphi.decrypt_phi_jsonb(pgphi.encrypted,text,text)                           key     42501  42501 42501 42501 22P02 22P02 42501 42501 22P02
pgphi.destroy_key(text,integer)                                              key     42501  42501 42501 42501 42501 42501 55000 42501 55000
pgphi.destruction_certificate(text,integer)                                  key     42501  42501 42501 42501 42501 42501 55000 55000 55000
pgphi.encrypt_phi(bytea,text,boolean,text)                                   key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.encrypt_phi(bytea,text,text)                                           key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.encrypt_phi(jsonb,text,boolean,text)                                   key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.encrypt_phi(jsonb,text,text)                                           key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.encrypt_phi(text,text,boolean,text)                                    key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.encrypt_phi(text,text,text)                                            key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.encrypt_phi_all_versions(bytea,text,text)                              key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.encrypt_phi_all_versions(text,text,text)                               key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.encrypted(bytea)                                                       type    ok     ok    ok    ok    ok    ok    ok    ok    ok
pgphi.encrypted_analyze(internal)                                            type    x      x     x     x     x     x     x     x     x
pgphi.encrypted_cmp(pgphi.encrypted,pgphi.encrypted)                         type    0A000  0A000 0A000 0A000 0A000 0A000 0A000 0A000 0A000
pgphi.encrypted_eq(pgphi.encrypted,pgphi.encrypted)                          type    0A000  0A000 0A000 0A000 0A000 0A000 0A000 0A000 0A000
pgphi.encrypted_ge(pgphi.encrypted,pgphi.encrypted)                          type    0A000  0A000 0A000 0A000 0A000 0A000 0A000 0A000 0A000
pgphi.encrypted_gt(pgphi.encrypted,pgphi.encrypted)                          type    0A000  0A000 0A000 0A000 0A000 0A000 0A000 0A000 0A000
pgphi.encrypted_hash(pgphi.encrypted)                                        type    0A000  0A000 0A000 0A000 0A000 0A000 0A000 0A000 0A000
pgphi.encrypted_hash_extended(pgphi.encrypted,bigint)                        type    0A000  0A000 0A000 0A000 0A000 0A000 0A000 0A000 0A000
pgphi.encrypted_in(cstring)                                                  type    ok     ok    ok    ok    ok    ok    ok    ok    ok
pgphi.encrypted_le(pgphi.encrypted,pgphi.encrypted)                          type    0A000  0A000 0A000 0A000 0A000 0A000 0A000 0A000 0A000
pgphi.encrypted_lt(pgphi.encrypted,pgphi.encrypted)                          type    0A000  0A000 0A000 0A000 0A000 0A000 0A000 0A000 0A000
pgphi.encrypted_ne(pgphi.encrypted,pgphi.encrypted)                          type    0A000  0A000 0A000 0A000 0A000 0A000 0A000 0A000 0A000
pgphi.encrypted_out(pgphi.encrypted)                                         type    ok     ok    ok    ok    ok    ok    ok    ok    ok
pgphi.encrypted_recv(internal)                                               type    x      x     x     x     x     x     x     x     x
pgphi.encrypted_send(pgphi.encrypted)                                        type    ok     ok    ok    ok    ok    ok    ok    ok    ok
pgphi.expire_key_grants()                                                    key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.flush_cache()                                                          key     42501  42501 42501 42501 42501 42501 42501 42501 ok
pgphi.grant_decrypt(text,regrole)                                            key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.grant_decrypt(text,regrole,timestamp with time zone)                   key     42501  42501 42501 42501 42501 42501 22023 42501 22023
pgphi.grant_encrypt(text,regrole)                                            key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.grant_encrypt(text,regrole,timestamp with time zone)                   key     42501  42501 42501 42501 42501 42501 22023 42501 22023
pgphi.has_key_privilege(regrole,text,text)                                   key     42501  42501 42501 42501 42501 42501 ok    ok    ok
pgphi.key_usage()                                                            key     42501  42501 42501 42501 42501 42501 ok    ok    ok
pgphi.key_version_usage(text,integer,interval)                               key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.mark_compromised(text,integer,text)                                    key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.protect_column(regclass,name,text,integer,name)                        key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.rebuild_blind_index(regclass,name,name,text,integer,name)              key     42501  42501 ok    42501 42501 ok    42501 42501 ok
pgphi.reencrypt(regclass,name,integer,name,text)                             key     42501  42501 42501 42501 42501 ok    42501 42501 ok
pgphi.reencrypt_value(bytea,text,text)                                       key     42501  42501 42501 42501 42501 ok    42501 42501 ok
pgphi.reencrypt_value(pgphi.encrypted,text,text)                             key     42501  42501 42501 42501 42501 ok    42501 42501 ok
pgphi.rekey(text,text,text)                                                  key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.resume_key(text,integer)                                               key     42501  42501 42501 42501 42501 42501 55000 42501 55000
pgphi.retire_key_version(text,integer,regclass[],text,interval)              key     42501  42501 42501 42501 42501 42501 55006 42501 55006
pgphi.revoke_decrypt(text,regrole)                                           key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.revoke_encrypt(text,regrole)                                           key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.rewrap_keys(text)                                                      key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.rotate_key(text)                                                       key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.rotation_report()                                                      key     42501  42501 42501 42501 42501 42501 ok    ok    ok
pgphi.set_break_glass_role(text,regrole,interval)                            key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.set_cryptoperiod(text,interval)                                        key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.set_decrypt_limit(text,regrole,bigint,interval)                          key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.suspend_key(text,integer,text)                                         key     42501  42501 42501 42501 42501 42501 ok    42501 ok
pgphi.unretire_key_version(text,integer)                                     key     42501  42501 42501 42501 42501 42501 55000 42501 55000
pgphi.verify_audit_log(text)                                                 key     42501  42501 42501 42501 42501 42501 42501 ok    ok
pgphi.verify_destruction_certificate(text)                                   key     42501  42501 42501 42501 42501 42501 ok    ok    ok
TABLE

# Privileges each kind holds on each relation of the extension, as
# PostgreSQL's ACL letters (r SELECT, a INSERT, w UPDATE, d DELETE,
# D TRUNCATE; for sequences r SELECT, U USAGE, w UPDATE), "-" for none. A
# SELECT is also run: it must succeed exactly where "r" is held.
my $relations = <<'TABLE';
# relation                      public enc   enc_g dec   dec_g app   cust  aud   super
pgphi.audit_log                 -      -     -     -     -     -     -     r     rawdD
pgphi.audit_anchors             -      -     -     -     -     -     -     r     rawdD
pgphi.break_glass_events        -      -     -     -     -     -     r     r     rawdD
pgphi.break_glass_roles         -      -     -     -     -     -     r     r     rawdD
pgphi.cache_stats               -      -     -     -     -     -     -     -     rawdD
pgphi.decrypt_limits            -      -     -     -     -     -     r     r     rawdD
pgphi.destroy_approvals         -      -     -     -     -     -     -     -     rawdD
pgphi.grant_approvals           -      -     -     -     -     -     r     r     rawdD
pgphi.key_grant_members         -      -     -     -     -     -     r     r     rawdD
pgphi.key_grants                -      -     -     -     -     -     -     -     rawdD
pgphi.key_inventory             -      -     -     -     -     -     r     r     rawdD
pgphi.key_use                   -      -     -     -     -     -     -     r     rawdD
pgphi.key_use_stats             -      -     -     -     -     -     -     r     rawdD
pgphi.key_versions              -      -     -     -     -     -     -     -     rawdD
pgphi.keys                      -      -     -     -     -     -     -     -     rawdD
pgphi.keys_key_id_seq           -      -     -     -     -     -     -     -     rUw
pgphi.reencrypt_progress        -      rawd  rawd  -     -     rawd  rawd  -     rawdD
pgphi.rekey_approvals           -      -     -     -     -     -     r     r     rawdD
pgphi.resume_approvals          -      -     -     -     -     -     r     r     rawdD
pgphi.seal_reservations         -      -     -     -     -     -     -     r     rawdD
TABLE

sub parse_table
{
	my ($text, $first_value) = @_;
	my %rows;
	for my $line (split /\n/, $text)
	{
		next if $line =~ /^\s*(#|$)/;
		# The name may contain spaces ("timestamp with time zone"): the
		# outcomes are the last cells.
		my @words = split /\s+/, $line;
		my $count = scalar(@kinds) + $first_value;
		my @values = splice(@words, -$count);
		my $name = $line =~ s/\s+\S+(?:\s+\S+){@{[$count - 1]}}\s*$//r;
		die "duplicate row $name" if exists $rows{$name};
		$rows{$name} = \@values;
	}
	return %rows;
}
my %expected_routine = parse_table($routines, 1);
my %expected_relation = parse_table($relations, 0);

my $node = PgphiTest::new_node('privileges');
$node->append_conf('postgresql.conf', "lock_timeout = 0\n");
$node->restart;
$node->safe_psql('postgres', q{
	SET client_min_messages = warning;
	CREATE EXTENSION pgphi;
	CREATE ROLE mx_public LOGIN;
	CREATE ROLE mx_enc LOGIN;   GRANT pgphi_encrypt TO mx_enc;
	CREATE ROLE mx_enc_g LOGIN; GRANT pgphi_encrypt TO mx_enc_g;
	CREATE ROLE mx_dec LOGIN;   GRANT pgphi_decrypt TO mx_dec;
	CREATE ROLE mx_dec_g LOGIN; GRANT pgphi_decrypt TO mx_dec_g;
	CREATE ROLE mx_app LOGIN;   GRANT pgphi_encrypt, pgphi_decrypt TO mx_app;
	CREATE ROLE mx_cust LOGIN;  GRANT pgphi_key_custodian TO mx_cust;
	CREATE ROLE mx_aud LOGIN;   GRANT pgphi_key_auditor TO mx_aud;
	CREATE ROLE mx_grantee;
	SELECT pgphi.create_key('mx_key');
	SELECT pgphi.create_blind_index_key('mx_bidx');
	SELECT pgphi.grant_encrypt(k, r) FROM unnest(ARRAY['mx_key', 'mx_bidx']) k, unnest(ARRAY['mx_enc_g', 'mx_app']::regrole[]) r;
	SELECT pgphi.grant_decrypt(k, r) FROM unnest(ARRAY['mx_key', 'mx_bidx']) k, unnest(ARRAY['mx_dec_g', 'mx_app']::regrole[]) r;
	CREATE SCHEMA mx;
	GRANT USAGE, CREATE ON SCHEMA mx TO PUBLIC;
	CREATE TABLE mx.mx_sample (v pgphi.encrypted);
	INSERT INTO mx.mx_sample VALUES (pgphi.encrypt_phi('sample', 'mx_key'));
	GRANT SELECT ON mx.mx_sample TO PUBLIC;
});
is($node->safe_psql('postgres', q{SELECT key_id FROM pgphi.keys WHERE name = 'mx_key'}), '1', 'mx_key is key 1');

sub role_of { my ($kind) = @_; return $kind eq 'super' ? 'postgres' : "mx_$kind"; }

# The routines, from the catalog.
my @routines = map { [ split /\|/, $_, -1 ] } split /\n/, $node->safe_psql('postgres', q{
	SELECT p.oid::regprocedure, p.proname, p.prokind,
	       p.prorettype = 'trigger'::regtype OR 'internal'::regtype = ANY (p.proargtypes::oid[]),
	       coalesce(array_to_string((p.proargnames)[1:p.pronargs - p.pronargdefaults], ','), ''),
	       coalesce((SELECT string_agg(format_type(t, NULL), ',' ORDER BY n)
	                   FROM unnest((p.proargtypes::oid[])[0:p.pronargs - p.pronargdefaults - 1]) WITH ORDINALITY u(t, n)), '')
	  FROM pg_proc p WHERE p.pronamespace = 'pgphi'::regnamespace ORDER BY 1::text});
ok(scalar(@routines) > 90, scalar(@routines) . ' routines in schema pgphi');

# Procedures change the table they work on: each kind gets its own, owned by it.
for my $r (grep { $_->[2] eq 'p' } @routines)
{
	for my $kind (@kinds)
	{
		my $table = "mx.$r->[1]_$kind";
		$node->safe_psql('postgres', qq{
			CREATE TABLE $table (id int, v pgphi.encrypted, plain text, b bytea);
			INSERT INTO $table SELECT i, pgphi.encrypt_phi('v' || i, 'mx_key'), 'p' || i, NULL
			  FROM generate_series(1, 20) i;
			ALTER TABLE $table OWNER TO @{[role_of($kind)]};
		});
	}
}

# Values under version 1, then version 2 becomes active: re-encryption has work to do.
$node->safe_psql('postgres', q{SELECT pgphi.rotate_key('mx_key')});

# A value for each argument, from its name and type.
sub sample_arg
{
	my ($routine, $name, $type, $kind) = @_;
	my $proname = $routine->[1];
	my $blind = $proname =~ /blind_index/ && $proname ne 'create_blind_index_key';
	return "'mx.$proname\_$kind'" if $type eq 'regclass' && $routine->[2] eq 'p';
	return "'mx.mx_sample'" if $type eq 'regclass';
	my %by_name = (
		col => $proname eq 'protect_column' ? "'plain'" : "'v'", index_column => "'b'", source_column => "'plain'",
		provider => "'local'", kek => "'default'", context => "''", privilege => "'decrypt'",
		view_name => "'mx_view_$kind'", normalization => "'none'", outcome => "'ok'", version => '1',
		batch_size => '100', index_bytes => '16', key_id => '1', value => "'abc'", max_values => '100',
		max_duration => "'1 hour'");
	return "'{\"a\": 1}'::jsonb" if $type eq 'jsonb';
	return $by_name{$name} if exists $by_name{$name} && $type ne 'bytea' && $type ne 'pgphi.encrypted';
	return $blind ? "'mx_bidx'" : $proname =~ /^create_/ ? "'mx_fresh'" : "'mx_key'"
	  if $name eq 'key_name' || $name eq 'name';
	my %by_type = (
		'pgphi.encrypted' => '(SELECT v FROM mx.mx_sample)',
		bytea => '(SELECT v::bytea FROM mx.mx_sample)',
		cstring => '(SELECT v::text FROM mx.mx_sample)::cstring',
		integer => '1', bigint => '0', boolean => 'false', interval => "'1 year'",
		'timestamp with time zone' => 'now()', regrole => "'mx_grantee'", text => "'x'", name => "'x'");
	return $by_type{$type} // "NULL::$type";
}

sub call_of
{
	my ($routine, $kind) = @_;
	my ($signature, $proname, $prokind, $uncallable, $names, $types) = @$routine;
	my @names = split /,/, $names, -1;
	my @types = split /,/, $types, -1;
	my @args = map { sample_arg($routine, $names[$_] // '', $types[$_], $kind) } 0 .. $#types;
	my $call = "pgphi.$proname(" . join(', ', @args) . ")";
	return $prokind eq 'p' ? "CALL $call" : "SELECT $call";
}

# One session per kind. Functions run in a transaction that is rolled back
# (so that, say, rotate_key leaves the next cell the same catalog); SET
# SESSION AUTHORIZATION, as the approvals and grants look at session_user.
my %actual;
for my $kind (@kinds)
{
	my $role = role_of($kind);
	my $script = "\\o /dev/null\nSET client_min_messages = error;\nSET statement_timeout = '20s';\n";
	for my $i (0 .. $#routines)
	{
		my $r = $routines[$i];
		if ($r->[3] eq 't')
		{
			$script .= "\\o\nSELECT 'CELL $i ' || CASE WHEN has_function_privilege('$role', '$r->[0]', 'EXECUTE') THEN 'x' ELSE '-' END;\n\\o /dev/null\n";
		}
		elsif ($r->[2] eq 'p')
		{
			$script .= "SET SESSION AUTHORIZATION $role;\n" . call_of($r, $kind) . ";\n\\echo CELL $i :SQLSTATE\nRESET SESSION AUTHORIZATION;\n";
		}
		else
		{
			$script .= "BEGIN;\nSET SESSION AUTHORIZATION $role;\n" . call_of($r, $kind) . ";\n\\echo CELL $i :SQLSTATE\nROLLBACK;\n";
		}
	}
	my ($stdout, $stderr);
	$node->psql('postgres', $script, stdout => \$stdout, stderr => \$stderr, on_error_stop => 0,
		extra_params => ['-At']);
	for my $line (split /\n/, $stdout)
	{
		next unless $line =~ /^CELL (\d+) (\S+)$/;
		my $state = $2 eq '00000' ? 'ok' : $2;
		$actual{ $routines[$1]->[0] }{$kind} = $state;
	}
}

my $cells = 0;
my @unclassified;
for my $r (@routines)
{
	my $signature = $r->[0];
	my $expected = $expected_routine{$signature};
	if (!$expected)
	{
		push @unclassified, $signature;
		next;
	}
	my ($touches, @outcomes) = @$expected;
	for my $k (0 .. $#kinds)
	{
		$cells++;
		is($actual{$signature}{ $kinds[$k] } // 'no answer', $outcomes[$k], "$signature as $kinds[$k]");
	}
}
is(join(', ', @unclassified), '', 'every routine has a row in the expected table');
my %present = map { $_->[0] => 1 } @routines;
is(join(', ', grep { !$present{$_} } sort keys %expected_routine), '', 'and every row names an existing routine');
note("routine matrix: $cells cells");
if ($ENV{MATRIX_PRINT})
{
	for my $r (@routines)
	{
		diag(sprintf("%-76s %s", $r->[0], join(' ', map { sprintf('%-5s', $actual{ $r->[0] }{$_} // '?') } @kinds)));
	}
}

# PUBLIC holds nothing that touches keys: the ACLs (with defaults filled in,
# since a NULL ACL means EXECUTE for PUBLIC) against the "touches" column.
my @public_routines = split /\n/, $node->safe_psql('postgres', q{
	SELECT p.oid::regprocedure FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
	 WHERE p.pronamespace = 'pgphi'::regnamespace AND a.grantee = 0 AND a.privilege_type = 'EXECUTE'
	 ORDER BY 1::text});
my @public_key_routines = grep { ($expected_routine{$_} // ['key'])->[0] ne 'type' } @public_routines;
is(join(', ', @public_key_routines), '', 'PUBLIC may execute no routine that touches keys (aclexplode)');
is(scalar(@public_routines), scalar(grep { $_->[0] eq 'type' } values %expected_routine),
	'PUBLIC may execute the ' . scalar(@public_routines) . ' type-support routines');

# The relations: privileges held, and a SELECT.
my @relations = split /\n/, $node->safe_psql('postgres', q{
	SELECT c.oid::regclass::text || '|' || c.relkind::text FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
	 WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
	 ORDER BY 1});
my @unclassified_relations;
my $relation_cells = 0;
for my $line (@relations)
{
	my ($relation, $relkind) = split /\|/, $line;
	my $expected = $expected_relation{$relation};
	if (!$expected)
	{
		push @unclassified_relations, $relation;
		next;
	}
	my @privileges = $relkind eq 'S' ? (['r', 'SELECT'], ['U', 'USAGE'], ['w', 'UPDATE'])
	  : (['r', 'SELECT'], ['a', 'INSERT'], ['w', 'UPDATE'], ['d', 'DELETE'], ['D', 'TRUNCATE']);
	my $function = $relkind eq 'S' ? 'has_sequence_privilege' : 'has_table_privilege';
	for my $k (0 .. $#kinds)
	{
		my $role = role_of($kinds[$k]);
		my $held = $node->safe_psql('postgres', "SELECT concat("
			  . join(', ', map { "CASE WHEN $function('$role', '$relation', '$_->[1]') THEN '$_->[0]' END" } @privileges)
			  . ")") || '-';
		my ($ret, $out, $err) = $node->psql('postgres',
			"SET SESSION AUTHORIZATION $role; SELECT count(*) FROM $relation;");
		my $selected = $err =~ /permission denied/ ? 'refused' : $ret == 0 ? 'read' : "error: $err";
		$relation_cells++;
		is("$held " . $selected, $expected->[$k] . ' ' . ($expected->[$k] =~ /r/ ? 'read' : 'refused'),
			"$relation as $kinds[$k]");
	}
}
is(join(', ', @unclassified_relations), '', 'every relation of the extension has a row in the expected table');
note("relation matrix: $relation_cells cells");
my $public_relations = $node->safe_psql('postgres', q{
	SELECT string_agg(c.oid::regclass::text, ', ') FROM pg_depend d JOIN pg_class c ON c.oid = d.objid,
	       aclexplode(coalesce(c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) a
	 WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
	   AND a.grantee = 0});
is($public_relations, '', 'PUBLIC holds no privilege on any relation of the extension (aclexplode)');

# --- Retirement that nobody can block ------------------------------------
# Mallory has no key rights at all, only a table of her own: she forges a
# header of version 1, and holds an exclusive lock on her table.
$node->safe_psql('postgres', q{
	SET client_min_messages = warning;
	CREATE ROLE mx_mallory LOGIN;
	SELECT pgphi.create_key('mx_lock_key');
	SELECT pgphi.rotate_key('mx_lock_key');
	CREATE TABLE mx.mallory_junk (payload bytea);
	ALTER TABLE mx.mallory_junk OWNER TO mx_mallory;
});
my $lock_key_id = $node->safe_psql('postgres', q{SELECT key_id FROM pgphi.keys WHERE name = 'mx_lock_key'});
$node->safe_psql('postgres', qq{SET SESSION AUTHORIZATION mx_mallory;
	INSERT INTO mx.mallory_junk SELECT '\\xa70101'::bytea || int4send($lock_key_id) || int4send(1)
	       || decode(repeat('00', 30), 'hex');});
my $mallory = $node->background_psql('postgres', extra_params => ['-U', 'mx_mallory']);
$mallory->query_safe('BEGIN; LOCK TABLE mx.mallory_junk IN ACCESS EXCLUSIVE MODE;');

sub as_custodian
{
	my ($sql) = @_;
	my $started = time;
	my ($ret, $out, $err) = $node->psql('postgres', "\\set VERBOSITY verbose\nSET SESSION AUTHORIZATION mx_cust;\n$sql",
		extra_params => ['-At']);
	return ($out, $err, time - $started);
}
my ($out, $err, $took) = as_custodian(q{SELECT relation, column_name, "values", owner, not_scanned
	FROM pgphi.key_version_usage('mx_lock_key', 1, lock_wait => '300ms')});
is($out, 'mx.mallory_junk|payload||mx_mallory|lock not available within 00:00:00.3',
	'a locked table is reported as not scanned, with its owner, instead of stalling the scan');
ok($took < 10, "the scan waited for the lock only briefly ($took s)");
($out, $err, $took) = as_custodian(q{SELECT pgphi.retire_key_version('mx_lock_key', 1)});
like($err, qr/55P03: pgphi key "mx_lock_key" version 1 could not be checked in 1 columns/,
	'retirement refuses while a table could not be scanned (55P03)');
like($err, qr/DETAIL:  mx\.mallory_junk\.payload \(owner mx_mallory\): lock not available within 00:00:02/,
	'naming the relation and its owner, after the default wait of 2 s');
ok($took < 20, "and does not wait for the lock's holder ($took s)");
($out, $err, $took) = as_custodian(q{SELECT pgphi.retire_key_version('mx_lock_key', 1,
	ignore_relations => ARRAY['mx.mallory_junk']::regclass[], reason => 'forged by mx_mallory, ticket 7')});
is($err, '', 'a custodian retires anyway, ignoring the relation, with a reason');
is($node->safe_psql('postgres', q{SELECT state FROM pgphi.key_versions v JOIN pgphi.keys k USING (key_id)
	WHERE k.name = 'mx_lock_key' AND v.version = 1}), 'retired', 'the version is retired');
is($node->safe_psql('postgres', q{SELECT login_role || ': ' || detail FROM pgphi.audit_log
	WHERE action = 'retire_ignoring' AND key_name = 'mx_lock_key'}),
	'mx_cust: ignored mx.mallory_junk.payload (owner mx_mallory): lock not available within 00:00:02; reason: forged by mx_mallory, ticket 7',
	'and the decision is in the audit log, with what was ignored and why');
$mallory->query_safe('COMMIT');
$mallory->quit;
# Without the lock, the forged value is counted, and the refusal names its owner.
$node->safe_psql('postgres', q{SELECT pgphi.create_key('mx_forge_key'); SELECT pgphi.rotate_key('mx_forge_key');});
my $forge_key_id = $node->safe_psql('postgres', q{SELECT key_id FROM pgphi.keys WHERE name = 'mx_forge_key'});
$node->safe_psql('postgres', qq{SET SESSION AUTHORIZATION mx_mallory;
	INSERT INTO mx.mallory_junk SELECT '\\xa70101'::bytea || int4send($forge_key_id) || int4send(1)
	       || decode(repeat('00', 30), 'hex');});
($out, $err) = as_custodian(q{SELECT pgphi.retire_key_version('mx_forge_key', 1)});
like($err, qr/55006: .*\n.*DETAIL:  mx\.mallory_junk\.payload \(owner mx_mallory\): 1/,
	'a forged value blocks retirement only until a custodian decides; the refusal names relation and owner');

done_testing();
