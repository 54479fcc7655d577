// Crypto-shredding that leaves nothing behind in the key catalog's heap.
//
// destroy_key sets wrapped_dek to NULL. An UPDATE in PostgreSQL writes a new
// tuple and leaves the old one, wrapped DEK included, in the page until VACUUM
// prunes it; and pruning (PageRepairFragmentation) only moves the surviving
// tuples together: the bytes of the removed ones stay in the page's free
// space until something overwrites them. Every earlier rewrap and state change
// of the version left such a copy too. Anyone who can read the relation files
// (or, before this, a superuser's UPDATE of the row) could get the DEK back.
//
// So, when a transaction that turned a version into `destroyed` commits, this
// module overwrites, in every page of pgphi.key_versions:
//
//  * the wrapped_dek bytes of every tuple version of that (key_id, version),
//    whatever its visibility (dead, recently dead, left by an aborted
//    transaction, or the one the destroying UPDATE itself superseded), with
//    zeros; the varlena header stays, so each tuple keeps its length and
//    stays a well-formed (all-zero) bytea for any old snapshot that still
//    reads it (it then fails authentication instead of unwrapping);
//  * the free space between pd_lower and pd_upper, the alignment padding
//    after each tuple, and the storage of dead line pointers, which hold
//    whatever pruned tuples left there.
//
// Each changed page is WAL-logged as a full-page image of the standard
// layout, whose hole (the free space) is left out of the record and restored
// as zeros on replay: a streaming standby and crash recovery end with the
// same zeroed page, and the record itself holds no DEK. (PostgreSQL's
// heap_inplace_update also overwrites a tuple in place and WAL-logs it, but
// only one tuple of unchanged length at a time, and never the free space;
// a page image covers all three at once.)
//
// When: at XACT_EVENT_PRE_COMMIT, the last moment the transaction can still
// read and write, and after everything the user's SQL can do (deferred
// triggers have fired). Earlier (in destroy_key itself) a ROLLBACK, or a
// ROLLBACK TO SAVEPOINT, would leave the version undestroyed with its DEK
// already zeroed: the overwrite is not transactional. At pre-commit the
// module first checks, with the transaction's own view (SnapshotSelf), that
// the version really is destroyed in what is about to commit (the
// subtransaction that destroyed it may have rolled back); if not, it touches
// nothing. Later (after the commit record) no error may happen at all, and
// reading buffers can fail. What can still abort the transaction after this
// callback is small (NOTIFY's queue being full, another extension's
// pre-commit callback; SERIALIZABLE transactions, whose serialization check
// comes after this callback, are refused to destroy by the guard trigger);
// the abort callback then warns that the version's DEK is gone while its row says it
// is not destroyed, so a custodian finishes with destroy_key. PREPARE
// TRANSACTION of a destruction is refused: the overwrite cannot wait for a
// COMMIT PREPARED that may come from another session, or never.
//
// Locks: ShareUpdateExclusiveLock on key_versions keeps VACUUM (which could
// move tuples and truncate the file) and a second shredding transaction out
// while the pages are scanned; ordinary reads and writes go on. Each page is
// changed under its buffer's exclusive content lock, inside a critical
// section, as any heap change is. A reader that holds only a pin (a
// sequential scan reading a tuple it saw before) may see the bytes change
// under it, as with heap_inplace_update; only tuples of the destroyed
// version change.
//
// Not covered here (docs/rotation-runbook.md says what to do): WAL segments and archives
// written before, base backups, pg_dump output, and statistics an older
// version of pgphi let ANALYZE take (the column's statistics target is 0 now).
#include "shared/postgres.hpp"

extern "C" {
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/xloginsert.h"
#include "catalog/namespace.h"
#include "nodes/pg_list.h"
#include "storage/bufmgr.h"
#include "storage/bufpage.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
}

#include <cstring>

namespace {

struct PendingShred {
    int32 key_id;
    int32 version;
    bool confirmed; // destroyed in the transaction's own view
};

List* g_pending = NIL;     // of PendingShred*, in TopTransactionContext
bool g_overwrote = false;  // pages were changed in this transaction

struct Columns {
    AttrNumber key_id, version, state, wrapped_dek;
};

AttrNumber column_of(TupleDesc desc, const char* name)
{
    for (int i = 0; i < desc->natts; ++i) {
        Form_pg_attribute att = TupleDescAttr(desc, i);
        if (!att->attisdropped && strcmp(NameStr(att->attname), name) == 0)
            return att->attnum;
    }
    elog(ERROR, "pgphi.key_versions has no column \"%s\"", name);
    return InvalidAttrNumber;
}

PendingShred* pending_for(HeapTuple tuple, TupleDesc desc, const Columns& cols)
{
    bool isnull;
    Datum key_id = heap_getattr(tuple, cols.key_id, desc, &isnull);
    if (isnull)
        return nullptr;
    Datum version = heap_getattr(tuple, cols.version, desc, &isnull);
    if (isnull)
        return nullptr;
    ListCell* cell;
    foreach (cell, g_pending) {
        auto* p = static_cast<PendingShred*>(lfirst(cell));
        if (p->key_id == DatumGetInt32(key_id) && p->version == DatumGetInt32(version))
            return p;
    }
    return nullptr;
}

// The wrapped DEK stored in the tuple, as a pointer into the page, or null.
struct varlena* stored_dek(HeapTuple tuple, TupleDesc desc, const Columns& cols)
{
    bool isnull;
    Datum value = heap_getattr(tuple, cols.wrapped_dek, desc, &isnull);
    return isnull ? nullptr : reinterpret_cast<struct varlena*>(DatumGetPointer(value));
}

void tuple_at(HeapTupleData* tuple, Relation rel, Page page, BlockNumber block, OffsetNumber offset, ItemId item)
{
    tuple->t_data = reinterpret_cast<HeapTupleHeader>(PageGetItem(page, item));
    tuple->t_len = ItemIdGetLength(item);
    tuple->t_tableOid = RelationGetRelid(rel);
    ItemPointerSet(&tuple->t_self, block, offset);
}

// Pass 1, under share locks: which pending versions are destroyed in what
// this transaction is about to commit; and no DEK of theirs may be stored out
// of line (the column's storage is PLAIN, so none is), or zeroing the tuple
// would not reach it. Raises before anything is changed.
void confirm_pending(Relation rel, const Columns& cols)
{
    TupleDesc desc = RelationGetDescr(rel);
    BlockNumber blocks = RelationGetNumberOfBlocks(rel);
    for (BlockNumber block = 0; block < blocks; ++block) {
        Buffer buffer = ReadBufferExtended(rel, MAIN_FORKNUM, block, RBM_NORMAL, nullptr);
        LockBuffer(buffer, BUFFER_LOCK_SHARE);
        Page page = BufferGetPage(buffer);
        OffsetNumber last = PageIsNew(page) ? InvalidOffsetNumber : PageGetMaxOffsetNumber(page);
        for (OffsetNumber offset = FirstOffsetNumber; offset <= last; offset = OffsetNumberNext(offset)) {
            ItemId item = PageGetItemId(page, offset);
            if (!ItemIdIsNormal(item))
                continue;
            HeapTupleData tuple;
            tuple_at(&tuple, rel, page, block, offset, item);
            PendingShred* pending = pending_for(&tuple, desc, cols);
            if (!pending)
                continue;
            struct varlena* dek = stored_dek(&tuple, desc, cols);
            if (dek && (VARATT_IS_EXTERNAL(dek) || VARATT_IS_COMPRESSED(dek)))
                elog(ERROR, "pgphi: a wrapped DEK of key id %d version %d is stored out of line or compressed",
                     pending->key_id, pending->version);
            if (dek == nullptr && HeapTupleSatisfiesVisibility(&tuple, SnapshotSelf, buffer)) {
                bool isnull;
                Datum state = heap_getattr(&tuple, cols.state, desc, &isnull);
                if (!isnull && strcmp(TextDatumGetCString(state), "destroyed") == 0)
                    pending->confirmed = true;
            }
        }
        UnlockReleaseBuffer(buffer);
    }
}

struct Range {
    char* start;
    Size length;
};

// Pass 2: overwrites one page, if anything on it needs it.
void overwrite_page(Relation rel, const Columns& cols, BlockNumber block)
{
    TupleDesc desc = RelationGetDescr(rel);
    Buffer buffer = ReadBufferExtended(rel, MAIN_FORKNUM, block, RBM_NORMAL, nullptr);
    LockBuffer(buffer, BUFFER_LOCK_EXCLUSIVE);
    Page page = BufferGetPage(buffer);
    if (PageIsNew(page)) {
        UnlockReleaseBuffer(buffer);
        return;
    }
    PageHeader header = reinterpret_cast<PageHeader>(page);

    // Everything to zero, found before the critical section.
    static Range ranges[2 * MaxHeapTuplesPerPage + 1];
    int count = 0;
    auto add_if_dirty = [&](char* start, Size length) {
        for (Size i = 0; i < length; ++i)
            if (start[i] != 0) {
                ranges[count++] = Range{start, length};
                return;
            }
    };
    OffsetNumber last = PageGetMaxOffsetNumber(page);
    for (OffsetNumber offset = FirstOffsetNumber; offset <= last; offset = OffsetNumberNext(offset)) {
        ItemId item = PageGetItemId(page, offset);
        if (ItemIdIsDead(item) && ItemIdHasStorage(item)) {
            add_if_dirty(static_cast<char*>(PageGetItem(page, item)), ItemIdGetLength(item));
            continue;
        }
        if (!ItemIdIsNormal(item))
            continue;
        char* start = static_cast<char*>(PageGetItem(page, item));
        Size length = ItemIdGetLength(item);
        // The alignment padding after the tuple belongs to it, and holds
        // whatever the space held before.
        if (ItemIdGetOffset(item) + MAXALIGN(length) <= BLCKSZ)
            add_if_dirty(start + length, MAXALIGN(length) - length);
        HeapTupleData tuple;
        tuple_at(&tuple, rel, page, block, offset, item);
        PendingShred* pending = pending_for(&tuple, desc, cols);
        if (!pending || !pending->confirmed)
            continue;
        if (struct varlena* dek = stored_dek(&tuple, desc, cols))
            add_if_dirty(VARDATA_ANY(dek), VARSIZE_ANY_EXHDR(dek));
    }
    if (header->pd_lower < header->pd_upper && header->pd_upper <= BLCKSZ)
        add_if_dirty(reinterpret_cast<char*>(page) + header->pd_lower, header->pd_upper - header->pd_lower);

    if (count > 0) {
        g_overwrote = true;
        START_CRIT_SECTION();
        for (int i = 0; i < count; ++i)
            memset(ranges[i].start, 0, ranges[i].length);
        MarkBufferDirty(buffer);
        // A full-page image: standbys and recovery get the same page, and
        // its hole (the zeroed free space) is not even in the record.
        if (RelationNeedsWAL(rel))
            log_newpage_buffer(buffer, true);
        END_CRIT_SECTION();
    }
    UnlockReleaseBuffer(buffer);
}

void shred_pending()
{
    Oid nsp = get_namespace_oid("pgphi", true);
    Oid relid = OidIsValid(nsp) ? get_relname_relid("key_versions", nsp) : InvalidOid;
    if (!OidIsValid(relid))
        return; // the extension was dropped in this transaction
    Relation rel = table_open(relid, ShareUpdateExclusiveLock);
    TupleDesc desc = RelationGetDescr(rel);
    Columns cols{column_of(desc, "key_id"), column_of(desc, "version"), column_of(desc, "state"),
                 column_of(desc, "wrapped_dek")};
    confirm_pending(rel, cols);
    BlockNumber blocks = RelationGetNumberOfBlocks(rel);
    for (BlockNumber block = 0; block < blocks; ++block)
        overwrite_page(rel, cols, block);
    table_close(rel, NoLock); // the lock is held to the end of the transaction
}

void shred_at_xact_end(XactEvent event, void*)
{
    switch (event) {
    case XACT_EVENT_PRE_COMMIT:
        if (g_pending != NIL)
            shred_pending();
        break;
    case XACT_EVENT_PRE_PREPARE:
        if (g_pending != NIL)
            ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
                            errmsg("cannot PREPARE a transaction that destroys a pgphi key version"),
                            errdetail("The wrapped DEK is erased when the destroying transaction commits."),
                            errhint("Destroy key versions in an ordinary transaction.")));
        break;
    case XACT_EVENT_ABORT:
        if (g_overwrote)
            ereport(WARNING,
                    (errmsg("pgphi erased the wrapped DEK of a key version being destroyed, then the "
                            "transaction aborted"),
                     errdetail("The version's DEK is gone, but its row does not say \"destroyed\"."),
                     errhint("Run pgphi.destroy_key() for it again.")));
        g_pending = NIL;
        g_overwrote = false;
        break;
    case XACT_EVENT_COMMIT:
    case XACT_EVENT_PREPARE:
        g_pending = NIL;
        g_overwrote = false;
        break;
    default:
        break;
    }
}

} // namespace

// pgphi._shred_at_commit(key_id, version): erase every stored copy of the
// version's wrapped DEK from pgphi.key_versions when this transaction
// commits, provided the version is destroyed by then. Called by the guard
// trigger on key_versions whenever a version becomes destroyed, by any path.
PGPHI_FUNCTION(pgphi_shred_at_commit)
{
    static bool registered = false;
    if (!registered) {
        RegisterXactCallback(shred_at_xact_end, nullptr);
        registered = true;
    }
    int32 key_id = PG_GETARG_INT32(0);
    int32 version = PG_GETARG_INT32(1);
    ListCell* cell;
    foreach (cell, g_pending) {
        auto* p = static_cast<PendingShred*>(lfirst(cell));
        if (p->key_id == key_id && p->version == version)
            PG_RETURN_VOID();
    }
    MemoryContext old = MemoryContextSwitchTo(TopTransactionContext);
    auto* p = static_cast<PendingShred*>(palloc0(sizeof(PendingShred)));
    p->key_id = key_id;
    p->version = version;
    g_pending = lappend(g_pending, p);
    MemoryContextSwitchTo(old);
    PG_RETURN_VOID();
}
