/*
 * The FUSE floor for scripts/bench: the least a low-level FUSE daemon can do
 * to serve one file. Adapted from libfuse's example/hello_ll.c (installed at
 * /usr/share/doc/libfuse3-dev/examples/hello_ll.c): one in-memory 1 KiB file
 * at dir/file — the same depth as a secret at vault/secret — opened with
 * FOPEN_DIRECT_IO and no flush, vaultfs's entry and attr timeouts (0 for the
 * directory, 1 s for the file), and the multi-threaded loop.
 *
 *   floor_ll MOUNTPOINT     (foreground; SIGTERM or fusermount3 -u ends it)
 */
#define FUSE_USE_VERSION 312

#include <fuse_lowlevel.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char content[1024];

enum { ROOT = 1, DIR_INO = 2, FILE_INO = 3 };

static int floor_stat(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	switch (ino) {
	case ROOT:
	case DIR_INO:
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
		return 0;
	case FILE_INO:
		st->st_mode = S_IFREG | 0444;
		st->st_nlink = 1;
		st->st_size = sizeof(content);
		return 0;
	}
	return -1;
}

static void floor_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;
	memset(&e, 0, sizeof(e));
	if (parent == ROOT && strcmp(name, "dir") == 0)
		e.ino = DIR_INO;
	else if (parent == DIR_INO && strcmp(name, "file") == 0)
		e.ino = FILE_INO;
	else {
		fuse_reply_err(req, ENOENT);
		return;
	}
	floor_stat(e.ino, &e.attr);
	/* vaultfs's timeouts: 0 for directories, 1 s for a secret */
	e.entry_timeout = e.attr_timeout = e.ino == FILE_INO ? 1.0 : 0.0;
	fuse_reply_entry(req, &e);
}

static void floor_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;
	(void)fi;
	if (floor_stat(ino, &st) != 0)
		fuse_reply_err(req, ENOENT);
	else
		fuse_reply_attr(req, &st, ino == FILE_INO ? 1.0 : 0.0);
}

static void floor_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != FILE_INO)
		fuse_reply_err(req, EISDIR);
	else if ((fi->flags & O_ACCMODE) != O_RDONLY)
		fuse_reply_err(req, EACCES);
	else {
		fi->direct_io = 1;
		fi->noflush = 1;
		fuse_reply_open(req, fi);
	}
}

static void floor_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	if ((size_t)off >= sizeof(content))
		fuse_reply_buf(req, NULL, 0);
	else
		fuse_reply_buf(req, content + off,
			       size < sizeof(content) - off ? size : sizeof(content) - off);
}

static const struct fuse_lowlevel_ops floor_ops = {
	.lookup = floor_lookup,
	.getattr = floor_getattr,
	.open = floor_open,
	.read = floor_read,
};

int main(int argc, char *argv[])
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s MOUNTPOINT\n", argv[0]);
		return 2;
	}
	memset(content, 'f', sizeof(content));
	char *fargv[] = {argv[0], "-o", "allow_other,fsname=floor", NULL};
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_session *se = fuse_session_new(&args, &floor_ops, sizeof(floor_ops), NULL);
	if (se == NULL || fuse_set_signal_handlers(se) != 0 || fuse_session_mount(se, argv[1]) != 0)
		return 1;
	struct fuse_loop_config *cfg = fuse_loop_cfg_create();
	fuse_loop_cfg_set_max_threads(cfg, 8);
	int ret = fuse_session_loop_mt(se, cfg);
	fuse_loop_cfg_destroy(cfg);
	fuse_session_unmount(se);
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	return ret ? 1 : 0;
}
