// SPDX-License-Identifier: GPL-2.0
/*
 * memhp_faults: does, on request, what buggy drivers and kernels do to memory hotplug, so that
 * the lab can show memhp-observer finding it. Loaded only inside a lab guest.
 *
 *   echo ACTION > /sys/module/memhp_faults/parameters/action
 *
 * map                  a MEMORY_DEVICE_GENERIC pagemap over a free region it requests (twice)
 * drop-owner           release the first one's region, keep it mapped    (pagemap_leak)
 * release-as-ram       remove_memory() over the last one's range: its sections go and
 *                      release_mem_region_adjustable() takes the device range (device_range_release)
 * remove-never-added   remove_memory() over a free range no one added   (unbalanced_remove)
 * leak-whole           add a memory block (offline, driver-managed), remove it, then claim
 *                      "System RAM (memhp_faults)" over it again          (resource_leak)
 * add-two              add two blocks (offline) under one driver-managed resource
 * leak-partial         remove the second of them, then stretch the resource back over it
 *                                                                        (resource_leak, partial)
 * widen-movable PFN    stretch node 0's Movable span to end at PFN, as a kernel that did not
 *                      shrink it would leave it                          (zone_span_leak)
 *
 * The memory added here has no backing: its blocks are never onlined (the scenario sets
 * auto_online_blocks to offline first). Free ranges are found from the top down and a range a
 * pagemap leaked cannot be added again, so the ranges are used before the pagemaps leak.
 * Nothing is undone at unload: a guest is disposable.
 */
#include <linux/ioport.h>
#include <linux/memory.h>
#include <linux/memory_hotplug.h>
#include <linux/memremap.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/version.h>

/* remove_memory() lost its nid argument in 5.15 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 15, 0)
#define remove_memory(start, size) remove_memory(0, start, size)
#endif

#define NAME "memhp_faults"
#define RAM_NAME "System RAM (memhp_faults)"
#define REGION_SIZE (128UL << 20)

static struct dev_pagemap *maps[2];  /* the pagemaps mapped, in order */
static int nmaps;
static u64 two;                      /* where add-two added its blocks */

#if !IS_ENABLED(CONFIG_GET_FREE_REGION) && !IS_ENABLED(CONFIG_DEVICE_PRIVATE)
/* before 6.1 the kernel has request_free_mem_region() only with CONFIG_DEVICE_PRIVATE: its
 * search, top down in steps of the (section-aligned) size, done here */
static struct resource *free_mem_region(struct resource *base, unsigned long size,
					const char *name)
{
	resource_size_t addr;
	struct resource *res;

	size = ALIGN(size, 1UL << PA_SECTION_SHIFT);
	for (addr = ALIGN_DOWN(base->end + 1 - size, size); addr > base->start; addr -= size) {
		if (region_intersects(addr, size, 0, IORES_DESC_NONE) != REGION_DISJOINT)
			continue;
		res = __request_region(base, addr, size, name, 0);
		return res ? res : ERR_PTR(-EBUSY);
	}
	return ERR_PTR(-ERANGE);
}
#define request_free_mem_region free_mem_region
#endif

/* a free, section-aligned physical range, found the way HMM drivers find theirs */
static int free_range(unsigned long size, u64 *start)
{
	struct resource *res = request_free_mem_region(&iomem_resource, size, NAME "_probe");

	if (IS_ERR(res))
		return PTR_ERR(res);
	*start = res->start;
	__release_region(&iomem_resource, res->start, size);
	return 0;
}

static int map(void)
{
	struct resource *res = request_free_mem_region(&iomem_resource, REGION_SIZE, NAME);
	struct dev_pagemap *pgmap;
	void *addr;

	if (nmaps == ARRAY_SIZE(maps))
		return -ENOSPC;
	if (IS_ERR(res))
		return PTR_ERR(res);
	pgmap = kzalloc(sizeof(*pgmap), GFP_KERNEL);
	if (!pgmap)
		return -ENOMEM;
	pgmap->type = MEMORY_DEVICE_GENERIC;
	pgmap->range.start = res->start;
	pgmap->range.end = res->end;
	pgmap->nr_range = 1;
	addr = memremap_pages(pgmap, NUMA_NO_NODE);
	if (IS_ERR(addr)) {
		kfree(pgmap);
		__release_region(&iomem_resource, res->start, REGION_SIZE);
		return PTR_ERR(addr);
	}
	maps[nmaps++] = pgmap;
	pr_info(NAME ": mapped [mem %#llx-%#llx]\n", pgmap->range.start, pgmap->range.end);
	return 0;
}

/* the first pagemap: its region goes, the pagemap stays (leaked for good) */
static int drop_owner(void)
{
	struct dev_pagemap *pgmap = maps[0];

	if (!pgmap)
		return -ENOENT;
	__release_region(&iomem_resource, pgmap->range.start, range_len(&pgmap->range));
	pr_info(NAME ": released [mem %#llx-%#llx], pagemap kept\n", pgmap->range.start,
		pgmap->range.end);
	return 0;
}

/* the last pagemap: its sections go as if it were System RAM; it is never unmapped */
static int release_as_ram(void)
{
	struct dev_pagemap *pgmap = nmaps ? maps[nmaps - 1] : NULL;
	int rc;

	if (!pgmap)
		return -ENOENT;
	rc = remove_memory(pgmap->range.start, range_len(&pgmap->range));
	pr_info(NAME ": remove_memory over pagemap [mem %#llx-%#llx]: %d\n", pgmap->range.start,
		pgmap->range.end, rc);
	return rc;
}

static int remove_never_added(void)
{
	u64 start;
	int rc = free_range(REGION_SIZE, &start);

	if (rc)
		return rc;
	rc = remove_memory(start, REGION_SIZE);
	pr_info(NAME ": remove_memory of never-added [mem %#llx-%#llx]: %d\n", start,
		start + REGION_SIZE - 1, rc);
	return rc;
}

static int add_offline(u64 *start, unsigned long blocks)
{
	unsigned long size = blocks * memory_block_size_bytes();
	int rc = free_range(size, start);

	if (rc)
		return rc;
	rc = add_memory_driver_managed(0, *start, size, RAM_NAME, MHP_NONE);
	pr_info(NAME ": added [mem %#llx-%#llx]: %d\n", *start, *start + size - 1, rc);
	return rc;
}

static int leak_whole(void)
{
	unsigned long block = memory_block_size_bytes();
	u64 start;
	int rc = add_offline(&start, 1);

	if (!rc)
		rc = remove_memory(start, block);
	if (rc)
		return rc;
	if (!__request_region(&iomem_resource, start, block, RAM_NAME,
			      IORESOURCE_SYSTEM_RAM | IORESOURCE_SYSRAM_DRIVER_MANAGED))
		return -EBUSY;
	pr_info(NAME ": [mem %#llx-%#llx] removed, " RAM_NAME " claimed again\n", start,
		start + block - 1);
	return 0;
}

static int add_two(void)
{
	return add_offline(&two, 2);
}

static int leak_partial(void)
{
	unsigned long block = memory_block_size_bytes();
	struct resource *res;
	int rc;

	if (!two)
		return -ENOENT;
	rc = remove_memory(two + block, block);
	if (rc)
		return rc;
	/* the kernel cut the resource back to the first block; stretch it over both again */
	for (res = iomem_resource.child; res; res = res->sibling)
		if (res->start == two && !strcmp(res->name, RAM_NAME))
			break;
	if (!res)
		return -ENOENT;
	rc = adjust_resource(res, two, 2 * block);
	pr_info(NAME ": [mem %#llx-%#llx] removed, " RAM_NAME " stretched over it: %d\n",
		two + block, two + 2 * block - 1, rc);
	return rc;
}

static int widen_movable(unsigned long end_pfn)
{
	struct zone *zone = &NODE_DATA(0)->node_zones[ZONE_MOVABLE];

	if (!zone->spanned_pages || end_pfn <= zone_end_pfn(zone))
		return -EINVAL;
	zone_span_writelock(zone);
	zone->spanned_pages = end_pfn - zone->zone_start_pfn;
	zone_span_writeunlock(zone);
	pr_info(NAME ": Movable of node 0 now ends at pfn %#lx\n", end_pfn);
	return 0;
}

static const struct {
	const char *name;
	int (*run)(void);
} actions[] = {
	{ "map", map },
	{ "drop-owner", drop_owner },
	{ "release-as-ram", release_as_ram },
	{ "remove-never-added", remove_never_added },
	{ "leak-whole", leak_whole },
	{ "add-two", add_two },
	{ "leak-partial", leak_partial },
};

static int action_set(const char *value, const struct kernel_param *kp)
{
	char word[32];
	unsigned long pfn;
	int i;

	if (sscanf(value, "widen-movable %lx", &pfn) == 1)
		return widen_movable(pfn);
	if (sscanf(value, "%31s", word) != 1)
		return -EINVAL;
	for (i = 0; i < ARRAY_SIZE(actions); i++)
		if (!strcmp(word, actions[i].name))
			return actions[i].run();
	return -EINVAL;
}

static const struct kernel_param_ops action_ops = { .set = action_set };
module_param_cb(action, &action_ops, NULL, 0200);
MODULE_PARM_DESC(action, "what to do wrong (see the source)");

static int __init memhp_faults_init(void)
{
	return 0;
}

static void __exit memhp_faults_exit(void)
{
}

module_init(memhp_faults_init);
module_exit(memhp_faults_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("memhp-observer lab: hotplug faults on request");
