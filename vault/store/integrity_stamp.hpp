// integrity_stamp: spares a start-up the full read of a large SQLite file
// (`PRAGMA quick_check` reads every page: about 0.45 s for a million
// secrets) when the file is exactly the one a vaultfs process left at its
// last clean close, after that process had itself found the file sound.
//
// The stamp, `DATABASE.checked` beside the file, records the file's device,
// inode, size and modification time (in nanoseconds). A process that opens
// the database read-write removes it first, and writes it again only once
// its last connection has closed (SQLite has checkpointed and removed the
// write-ahead log). So a crash, a write by anything else (an edit, a
// restore, a copy over the file), or a pending write-ahead log leaves no
// stamp or one that no longer matches, and the next start checks the whole
// file again.
//
// What it does not catch: a file damaged at rest between two runs without
// its size or time changing (a failing disk). Such a page fails when it is
// read, as it would at run time, and every value is authenticated when it
// is decrypted; `sqlite3 DATABASE 'PRAGMA integrity_check'` reads it all.
#pragma once

#include <string>

namespace vaultfs::vault::integrity_stamp {

// The stamp names the file as it is now, and no write-ahead log is pending.
bool unchanged(const std::string& db_path);
// Removes the stamp: the file is about to change.
void clear(const std::string& db_path);
// Stamps the file as it is now (after the last connection closed).
void record(const std::string& db_path);

}  // namespace vaultfs::vault::integrity_stamp
