// Store: the write side -- the group-commit queue that runs every write in one
// writer transaction, and commits whose outcome was not confirmed (see
// store.hpp).
#include "vault/store/store.hpp"

#include <unistd.h>

#include <spdlog/spdlog.h>

#include "vault/store/store_detail.hpp"

namespace vaultfs::vault {

using namespace store_detail;

// ---- writes ------------------------------------------------------------------

Result<void> Store::write(const Work& work, bool bounded)
{
    if (read_only_)
        return fail(Errc::storage, "database " + path_ + " is open read-only");
    PendingWrite mine{&work, {}, false, bounded ? request_deadline() : std::nullopt};
    std::unique_lock lock(queue_mutex_);
    queue_.push_back(&mine);
    // Wait until a leader has run our work, or until we can lead.
    queue_cv_.wait(lock, [&] { return mine.done || !leader_active_; });
    if (mine.done)
        return mine.result;

    leader_active_ = true;
    std::deque<PendingWrite*> batch;
    batch.swap(queue_);
    lock.unlock();
    Result<void> committed;
    try {
        committed = run_batch(batch);
    } catch (const std::exception& e) {
        // Never leave the transaction open or the followers waiting.
        (void)writer_->exec("ROLLBACK");
        committed = fail(Errc::storage, std::string("write failed: ") + e.what());
    }
    lock.lock();
    for (auto* p : batch) {
        if (!committed)
            p->result = tl::unexpected(committed.error());
        p->done = true;
    }
    // Whatever committed (or did not), cached lookups may be stale now.
    generation_.fetch_add(1);
    leader_active_ = false;
    queue_cv_.notify_all();
    return mine.result;
}

std::size_t Store::pending_writes()
{
    std::lock_guard lock(queue_mutex_);
    return queue_.size();
}

// Runs every unit of `batch` in one transaction; each unit's result is stored
// in it. Returns the commit's own outcome.
Result<void> Store::run_batch(std::deque<PendingWrite*>& batch)
{
    // The batch answers by its most pressed request's deadline (each
    // waited behind the batch before it, which ended by its own).
    std::optional<std::chrono::steady_clock::time_point> deadline;
    for (const auto* p : batch)
        if (p->deadline && (!deadline || *p->deadline < *deadline))
            deadline = p->deadline;
    if (deadline && std::chrono::steady_clock::now() >= *deadline)
        return fail(Errc::storage, "the database did not answer within the staleness bound (" +
                                       std::to_string(options_.staleness_bound.count()) +
                                       " ms) while this write waited behind another");
    if (writer_->broken()) {
        // Lost (a restarted server, a failover, a deadline): a new session,
        // on whichever host libpq's connection string now finds writable.
        auto c = connect(false, deadline);
        if (!c)
            return fail(c.error().code, "cannot start a write transaction: " + c.error().message);
        writer_ = std::move(*c);
    }
    db::Connection& c = *writer_;
    c.set_deadline(deadline);
    struct Unbound {
        db::Connection& c;
        ~Unbound() { c.set_deadline(std::nullopt); }
    } unbind{c};
    // Transaction control through cached statements: parsing these on every
    // commit showed up in profiles.
    const auto control = [&](const char* sql) -> Result<void> {
        auto q = c.query(sql);
        if (!q)
            return tl::unexpected(q.error());
        return q->run();
    };
    if (auto r = control(c.begin_write()); !r)
        return fail(r.error().code, "cannot start a write transaction: " + r.error().message);
    Transaction tx(c, host_id_, shared_);
    // A lone unit needs no savepoint: its failure rolls back the whole.
    const bool alone = batch.size() == 1;
    bool any_ok = false;
    for (auto* p : batch) {
        if (!alone) {
            if (auto r = control("SAVEPOINT unit"); !r) {
                p->result = tl::unexpected(r.error());
                continue;
            }
        }
        p->result = (*p->work)(tx);
        any_ok = any_ok || p->result.has_value();
        if (!alone) {
            if (!p->result)
                (void)control("ROLLBACK TO unit");
            (void)control("RELEASE unit");
        }
        // Some errors (SQLITE_FULL, IOERR, NOMEM; a lost PostgreSQL session)
        // end the whole transaction by themselves: nothing of this batch can
        // commit any more.
        if (!c.in_transaction())
            return fail(p->result ? Errc::storage : p->result.error().code,
                        "the write transaction was rolled back: " +
                            (p->result ? std::string("by the database") : p->result.error().message));
    }
    if (!any_ok) {
        (void)control("ROLLBACK");
        return {};  // every unit carries its own error
    }
    // The change feed (vault/store/feed.hpp): writers queue on feed's row
    // until COMMIT, so revisions commit in order.
    // On PostgreSQL the transaction's id comes along: should the server stop
    // answering at COMMIT, it is how the outcome is looked up later.
    std::int64_t xid = 0;
    auto rev = shared_ ? first<std::int64_t>(
                             c, "UPDATE feed SET rev = rev + 1 WHERE id = 1 RETURNING rev, txid_current()",
                             [](db::Query&) {},
                             [&](const db::Query& q) {
                                 xid = q.int64(1);
                                 return q.int64(0);
                             })
                             .and_then([](std::optional<std::int64_t> r) -> Result<std::int64_t> {
                                 if (!r)
                                     return fail(Errc::storage, "the feed row is missing");
                                 return *r;
                             })
                       : db::integer(c, "UPDATE feed SET rev = rev + 1 WHERE id = 1 RETURNING rev", [](db::Query&) {});
    Result<void> logged = rev ? run(c, "INSERT INTO changes (rev, host, at) VALUES (?, ?, ?)",
                                    [&](db::Query& q) { q.bind(1, *rev).bind(2, host_id_).bind(3, now_micros()); })
                              : Result<void>(tl::unexpected(rev.error()));
    if (logged && *rev % 1000 == 0)
        logged = run(c, "DELETE FROM changes WHERE rev <= ?", [&](db::Query& q) { q.bind(1, *rev - 1000); });
    if (logged && shared_)
        logged = run(c, "SELECT pg_notify('vaultfs_changes', ?)",
                     [&](db::Query& q) { q.bind(1, std::to_string(*rev)); });
    if (!logged) {
        (void)control("ROLLBACK");
        return fail(logged.error().code, "the change feed cannot be written: " + logged.error().message);
    }
    if (auto r = control("COMMIT"); !r) {
        if (shared_ && c.broken() && xid != 0) {
            // The server stopped answering (or the session broke) after
            // COMMIT was sent: it may have committed. Never a second try
            // (that would be a duplicate); the outcome is looked up when
            // the server answers again, and reported.
            std::string why = "the database did not confirm the commit of transaction " + std::to_string(xid) +
                              " (" + r.error().message + "): it may have committed; its outcome is looked up and "
                              "audited when the database answers";
            std::lock_guard lock(in_doubt_mutex_);
            in_doubt_.push_back(InDoubt{xid, why});
            spdlog::error("{}", why);
            return fail(Errc::in_doubt, std::move(why));
        }
        (void)control("ROLLBACK");
        return fail(r.error().code, "commit failed: " + r.error().message);
    }
    return {};
}

void Store::on_in_doubt_resolved(InDoubtResolved f)
{
    // Also waits for a report under way: none runs after it is replaced.
    std::lock_guard report(in_doubt_report_mutex_);
    on_in_doubt_resolved_ = std::move(f);
}

std::size_t Store::in_doubt() const
{
    std::lock_guard lock(in_doubt_mutex_);
    return in_doubt_.size();
}

void Store::resolve_in_doubt(db::Connection& c)
{
    std::vector<InDoubt> pending;
    {
        std::lock_guard lock(in_doubt_mutex_);
        if (in_doubt_.empty())
            return;
        pending = in_doubt_;
    }
    for (const auto& d : pending) {
        // 'committed', 'aborted', or 'in progress' (the server resumed and
        // is finishing it: asked again at the next confirmation).
        auto status = first<std::string>(
            c, "SELECT txid_status(?)", [&](db::Query& q) { q.bind(1, d.xid); },
            [](const db::Query& q) { return q.is_null(0) ? std::string() : q.text(0); });
        if (!status)
            return;  // asked again at the next confirmation
        const std::string s = status->value_or("");
        if (s == "in progress")
            continue;
        const bool committed = s == "committed";
        const std::string outcome = committed ? "committed" : s == "aborted" ? "rolled back" : "unknown";
        spdlog::warn("the commit of transaction {}, in doubt until now: {}", d.xid, outcome);
        {
            std::lock_guard lock(in_doubt_mutex_);
            std::erase_if(in_doubt_, [&](const InDoubt& x) { return x.xid == d.xid; });
        }
        if (committed)
            generation_.fetch_add(1);
        std::lock_guard report(in_doubt_report_mutex_);
        if (on_in_doubt_resolved_)
            on_in_doubt_resolved_(d.xid, outcome, d.failed_with);
    }
}

}  // namespace vaultfs::vault
