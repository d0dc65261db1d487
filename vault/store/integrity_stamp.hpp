// integrity_stamp: spares a start-up the full read of a large SQLite file
// (`PRAGMA quick_check` reads every page: about 0.45 s for a million
// secrets) when the file is exactly the one a vaultfs process left at its
// last clean close, where it passed quick_check.
//
// The stamp, `DATABASE.checked` beside the file, records the file's device,
// inode, size and modification time (in nanoseconds). A process that opens
// the database read-write removes it first, and writes it again only once
// the file passed quick_check at its close and its last connection has
// closed (SQLite has checkpointed and removed the write-ahead log). So a
// crash, a write by anything else (an edit, a restore, a copy over the
// file), or a pending write-ahead log leaves no stamp or one that no longer
// matches, and the next start checks the whole file again.
//
// It is a health check's shortcut, not a defence: the stamp is not
// authenticated, and whoever can edit the database can restore its time
// and edit the stamp. Against such an editor every value and sealed key is
// authenticated when it is decrypted. Nor does it see a file damaged at
// rest without its size or time changing (a failing disk, or a rewrite
// within the file system's timestamp tick of the close): such a page fails
// when it is read, as at run time; `sqlite3 DATABASE 'PRAGMA
// integrity_check'` reads it all.
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
