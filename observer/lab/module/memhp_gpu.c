// SPDX-License-Identifier: GPL-2.0
/*
 * memhp_gpu: device-private memory the way a GPU driver (amdkfd, nouveau) makes it, so that the
 * lab can show memhp-observer watching the HMM path. Built only for a kernel with
 * CONFIG_DEVICE_PRIVATE (Kbuild), loaded only inside a lab guest.
 *
 *   echo ACTION > /sys/module/memhp_gpu/parameters/action
 *
 * map           a free region from the top of the physical address space
 *               (devm_request_free_mem_region) and a MEMORY_DEVICE_PRIVATE pagemap over it
 *               (devm_memremap_pages), as amdkfd's svm_migrate_init does
 * unmap         the last mapped chunk torn down as amdkfd does (devm_memunmap_pages, then
 *               devm_release_mem_region): clean, the Device zone's span stays
 * claim ADDR    the same, with the region taken at ADDR (hex), where a DIMM is plugged next:
 *               its hot-add then fails against it                 (device_private_conflict)
 * past-bits     a pagemap over the first 128 MiB past the CPU's physical address bits, where no
 *               region can be requested, as a driver that computes its own range would
 *                                                                 (device_private_conflict)
 * release-as-ram  remove_memory() over the last chunk with a region (claim's):
 *               release_mem_region_adjustable() releases a device range as System RAM, the
 *               driver's region with it     (device_range_release, then pagemap_leak)
 *
 * Each chunk is CHUNK_SIZE. The device pages are never handed out, so migrate_to_ram is never
 * called and folio_free has nothing to give back. It has no exit: the pagemaps point at its
 * code, so it never unloads (a guest is disposable).
 */
#include <linux/device.h>
#include <linux/ioport.h>
#include <linux/memory_hotplug.h>
#include <linux/memremap.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/slab.h>
#include <asm/processor.h>

#define NAME "memhp_gpu"
#define CHUNK_SIZE (128UL << 20)
#define MAX_CHUNKS 8

struct chunk {
	struct dev_pagemap pgmap;
	struct resource *res;   /* NULL: no region (past-bits) */
};

static struct device *gpu;           /* the "GPU": a root device the devm resources hang on */
static struct chunk *chunks[MAX_CHUNKS];
static int nchunks;

static vm_fault_t gpu_migrate_to_ram(struct vm_fault *vmf)
{
	return VM_FAULT_SIGBUS;
}

/* from 7.x dev_pagemap_ops frees folios (page_free before) */
static void gpu_free(struct folio *folio)
{
}

static const struct dev_pagemap_ops gpu_ops = {
	.folio_free = gpu_free,
	.migrate_to_ram = gpu_migrate_to_ram,
};

/* a MEMORY_DEVICE_PRIVATE pagemap over [start, start + CHUNK_SIZE) */
static int map_at(u64 start, struct resource *res, bool devm)
{
	struct chunk *c;
	void *addr;

	if (nchunks == MAX_CHUNKS)
		return -ENOSPC;
	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	c->res = res;
	c->pgmap.type = MEMORY_DEVICE_PRIVATE;
	c->pgmap.range.start = start;
	c->pgmap.range.end = start + CHUNK_SIZE - 1;
	c->pgmap.nr_range = 1;
	c->pgmap.ops = &gpu_ops;
	c->pgmap.owner = &gpu;
	addr = devm ? devm_memremap_pages(gpu, &c->pgmap) : memremap_pages(&c->pgmap, NUMA_NO_NODE);
	if (IS_ERR(addr)) {
		pr_info(NAME ": memremap_pages [mem %#llx-%#llx]: %ld\n", start,
			start + CHUNK_SIZE - 1, PTR_ERR(addr));
		kfree(c);
		return PTR_ERR(addr);
	}
	chunks[nchunks++] = c;
	pr_info(NAME ": mapped device-private [mem %#llx-%#llx]\n", start, start + CHUNK_SIZE - 1);
	return 0;
}

/* devm_request_free_mem_region() under `base`, then the pagemap over what it gave */
static int map_under(struct resource *base)
{
	struct resource *res = devm_request_free_mem_region(gpu, base, CHUNK_SIZE);
	int rc;

	if (IS_ERR(res))
		return PTR_ERR(res);
	rc = map_at(res->start, res, true);
	if (rc)
		devm_release_mem_region(gpu, res->start, resource_size(res));
	return rc;
}

static int map(void)
{
	return map_under(&iomem_resource);
}

static int claim(u64 start)
{
	struct resource base = DEFINE_RES_MEM(start, CHUNK_SIZE);

	return map_under(&base);
}

static int unmap(void)
{
	struct chunk *c = nchunks ? chunks[nchunks - 1] : NULL;

	if (!c || !c->res)
		return -ENOENT;
	devm_memunmap_pages(gpu, &c->pgmap);
	devm_release_mem_region(gpu, c->res->start, resource_size(c->res));
	pr_info(NAME ": unmapped and released [mem %#llx-%#llx]\n", c->pgmap.range.start,
		c->pgmap.range.end);
	chunks[--nchunks] = NULL;
	kfree(c);
	return 0;
}

static int past_bits(void)
{
	return map_at(1ULL << boot_cpu_data.x86_phys_bits, NULL, false);
}

static int release_as_ram(void)
{
	struct chunk *c = NULL;
	int i, rc;

	for (i = nchunks - 1; i >= 0 && !c; i--)
		if (chunks[i]->res)
			c = chunks[i];
	if (!c)
		return -ENOENT;
	rc = remove_memory(c->pgmap.range.start, CHUNK_SIZE);
	pr_info(NAME ": remove_memory over device-private [mem %#llx-%#llx]: %d\n",
		c->pgmap.range.start, c->pgmap.range.end, rc);
	return rc;
}

static int action_set(const char *value, const struct kernel_param *kp)
{
	u64 start;

	if (sscanf(value, "claim %llx", &start) == 1)
		return claim(start);
	if (sysfs_streq(value, "map"))
		return map();
	if (sysfs_streq(value, "unmap"))
		return unmap();
	if (sysfs_streq(value, "past-bits"))
		return past_bits();
	if (sysfs_streq(value, "release-as-ram"))
		return release_as_ram();
	return -EINVAL;
}

static const struct kernel_param_ops action_ops = { .set = action_set };
module_param_cb(action, &action_ops, NULL, 0200);
MODULE_PARM_DESC(action, "what the driver does (see the source)");

static int __init memhp_gpu_init(void)
{
	gpu = root_device_register(NAME);
	return PTR_ERR_OR_ZERO(gpu);
}

module_init(memhp_gpu_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("memhp-observer lab: device-private memory as a GPU driver makes it");
